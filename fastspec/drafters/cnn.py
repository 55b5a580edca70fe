"""CNNDrafter: a small CAUSAL convolutional LM sharing the target's vocabulary.

Left-padded convolutions only (position t sees tokens <= t), trained on shifted labels (the
seed's CNN padded symmetrically and trained on unshifted labels, which leaks the answer).
Drafting needs only the last ``receptive_field`` tokens, so the drafter is stateless; the γ-step
greedy loop is one native call (``torch.ops.fastspec.cnn_draft_greedy``) and
:func:`cnn_draft_reference` is its Python twin.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from fastspec.drafters.context import right_to_left_pad
from fastspec.drafters.neural import NeuralDrafter, TokenModel, choose_tokens, native_choice_kwargs


class CausalConvLM(TokenModel):
    """embed (+proj) + source bias -> L x [causal conv k, GELU, residual] -> LayerNorm -> head."""

    def __init__(self, vocab_size: int, embed_dim: int, dim: int = 256, num_layers: int = 3, kernel_size: int = 4,
                 shortlist_size: Optional[int] = None):
        super().__init__(vocab_size, embed_dim, dim, shortlist_size)
        if num_layers < 1 or kernel_size < 1:
            raise ValueError("num_layers and kernel_size must be >= 1")
        self.num_layers, self.kernel_size = int(num_layers), int(kernel_size)
        self.src_proj = nn.Linear(self.embed_dim, self.dim)
        self.convs = nn.ModuleList(nn.Conv1d(self.dim, self.dim, self.kernel_size) for _ in range(self.num_layers))
        self.norm = nn.LayerNorm(self.dim)
        self.head = self.make_head(self.dim)  # [N or V, dim]

    def config_dict(self) -> dict:
        return dict(self.base_config(), num_layers=self.num_layers, kernel_size=self.kernel_size)

    @property
    def receptive_field(self) -> int:
        return self.num_layers * (self.kernel_size - 1) + 1

    def source_bias(self, source: torch.Tensor) -> torch.Tensor:
        """source [B,S] (-1 pad) -> [B,D], added to every input position."""
        return self.src_proj(self.pooled_source(source))

    def hidden(self, ids: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        """ids [B,L] (-1 = pad, masked to zero at every layer), src_bias [B,D] -> [B,L,D]."""
        mask = (ids >= 0).unsqueeze(-1).to(src_bias.dtype)  # [B,L,1]
        x = (self.embed_tokens(ids) + src_bias.unsqueeze(1)) * mask
        for conv in self.convs:
            y = conv(F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0)))  # causal: pad on the left only
            x = (x + F.gelu(y.transpose(1, 2))) * mask
        return x

    def forward(self, ids: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """ids [B,L] right-padded -1, source [B,S] -1 padded -> head logits [B,L,N] (N = V for a full head)."""
        return self.head(self.norm(self.hidden(ids, self.source_bias(source))))


def cnn_draft_reference(model: CausalConvLM, window: torch.Tensor, src_bias: torch.Tensor, gamma: int,
                        sampling=None, prev_tokens=None, generator=None):
    """Python twin of the native loop (recomputes the window every step).

    window [B,R] left-padded -1 -> (tokens [B,γ] (target ids), head logits [B,γ,N] (greedy) or q
    [B,γ,V] (sampling; zero outside a shortlist)).
    sampling: SamplingParams with do_sample (q from ops.process_logits, torch.multinomial with
    ``generator``; prev_tokens [B,L] feed the repetition penalty); None = greedy."""
    tokens, scores_all = [], []
    win, prev = window.clone(), prev_tokens
    for _ in range(gamma):
        last = model.hidden(win, src_bias)[:, -1]  # [B,D]
        last = F.layer_norm(last, (last.shape[-1],), model.norm.weight, model.norm.bias, model.norm.eps)
        logits = model.head(last)  # [B,N] (the module: an int8 head works too)
        nxt, scores, prev = choose_tokens(model, logits, sampling, prev, generator)
        tokens.append(nxt)
        scores_all.append(scores)
        win = torch.cat([win[:, 1:], nxt[:, None]], dim=1)
    return torch.stack(tokens, 1), torch.stack(scores_all, 1)


def cnn_draft_native(model: CausalConvLM, window: torch.Tensor, src_bias: torch.Tensor, gamma: int,
                     sampling=None, prev_tokens=None, generator=None):
    """The γ-step loop in one native call (incremental after step 1; the maths of the twin)."""
    proj = model.in_proj
    return torch.ops.fastspec.cnn_draft(
        window, src_bias, model.embed.weight, proj.weight if proj is not None else None,
        proj.bias if proj is not None else None, [c.weight for c in model.convs], [c.bias for c in model.convs],
        model.norm.weight, model.norm.bias, float(model.norm.eps), model.head.weight, model.head.bias, int(gamma),
        **native_choice_kwargs(model, sampling, prev_tokens, generator),
    )


class CNNDrafter(NeuralDrafter):
    """Causal CNN drafter; build with ``CNNDrafter.from_target(target, dim=..., num_layers=...)``."""

    kind = "cnn"
    model_class = CausalConvLM

    def _condition(self) -> None:
        self._src_bias = self.model.source_bias(self._source)  # [B,D], once per request

    def _window(self, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return right_to_left_pad(seq, lens, self.model.receptive_field)  # [B,R]

    def _draft(self, seq, lens, gamma, sampling, prev):
        run = cnn_draft_native if self.native else cnn_draft_reference
        return run(self.model, self._window(seq, lens), self._src_bias, gamma, sampling, prev, self._generator)


__all__ = ["CNNDrafter", "CausalConvLM", "cnn_draft_reference", "cnn_draft_native"]
