"""What the small neural drafters (CNN, LSTM) share: embeddings, source conditioning, the
drafter sequence, sampling, training through fastspec.distill.Trainer, and save/load.

The drafter reads ``[start] + generated`` per row, where ``start`` is the decoder start token
(seq2seq) or the last prompt token (causal), and is conditioned on the source through the mean
of its token embeddings, computed once per request. Training uses the same sequence, shifted:
position t predicts output token t, so nothing leaks (both models are strictly causal).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastspec import ops
from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.context import request_source
from fastspec.drafters.io import load_folder, save_folder


class TokenModel(nn.Module):
    """Embedding [V,E] (+ projection E->D when E != D) and mean-pooled source embeddings."""

    def __init__(self, vocab_size: int, embed_dim: int, dim: int):
        super().__init__()
        self.vocab_size, self.embed_dim, self.dim = int(vocab_size), int(embed_dim), int(dim)
        self.embed = nn.Embedding(self.vocab_size, self.embed_dim)
        self.in_proj = nn.Linear(self.embed_dim, self.dim) if self.embed_dim != self.dim else None

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (-1 = pad, reads row 0; callers mask) -> [..., D]."""
        x = self.embed(ids.clamp(min=0))
        return self.in_proj(x) if self.in_proj is not None else x

    def pooled_source(self, source: torch.Tensor) -> torch.Tensor:
        """source [B,S] (-1 = pad) -> mean embedding of the real tokens [B,E] (zeros if none)."""
        mask = (source >= 0).unsqueeze(-1).to(self.embed.weight.dtype)  # [B,S,1]
        total = (self.embed(source.clamp(min=0)) * mask).sum(1)
        return total / mask.sum(1).clamp(min=1.0)

    def init_from_target(self, target: nn.Module) -> None:
        """Copy the target's input embeddings (their width must be embed_dim; extra rows dropped)."""
        weight = target.get_input_embeddings().weight
        if weight.shape[1] != self.embed_dim:
            raise ValueError(f"target embeddings are {weight.shape[1]} wide, the drafter's embed_dim is {self.embed_dim}")
        rows = min(weight.shape[0], self.vocab_size)
        with torch.no_grad():
            self.embed.weight[:rows].copy_(weight[:rows].to(self.embed.weight.dtype))


def choose_tokens(logits: torch.Tensor, sampling=None, prev: Optional[torch.Tensor] = None, generator=None):
    """Python twin of the runtime's token choice. logits [B,V] ->
    (tokens [B], logits (greedy) or q [B,V] (sampling), prev grown by the tokens)."""
    if sampling is None or not sampling.do_sample:
        return logits.argmax(-1), logits, prev
    q = ops.process_logits(
        logits.float()[:, None], prev_tokens=prev, do_sample=True, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
    )[:, 0]
    token = torch.multinomial(q, 1, generator=generator)[:, 0]
    prev = token[:, None] if prev is None else torch.cat([prev, token[:, None]], dim=1)
    return token, q, prev


def native_choice_kwargs(sampling=None, prev: Optional[torch.Tensor] = None, generator=None) -> dict:
    """The runtime ops' sampling arguments (empty for greedy)."""
    if sampling is None or not sampling.do_sample:
        return {}
    return dict(do_sample=True, temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                top_p=float(sampling.top_p), repetition_penalty=float(sampling.repetition_penalty),
                prev_tokens=prev, generator=generator)


def pad_rows(rows: Sequence[Sequence[int]], device, pad: int = -1) -> torch.Tensor:
    """Right-pad python rows into [B,max_len] int64 (at least 1 column)."""
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            out[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)


class NeuralStudent:
    """The trainer's view of a CNN/LSTM drafter (see fastspec.distill.students for the contract)."""

    def __init__(self, drafter: "NeuralDrafter"):
        self.drafter = drafter
        self.module = drafter.model
        self.vocab_size = drafter.model.vocab_size

    def _inputs(self, source_ids, outputs_prefix, device):
        starts = [self.drafter.start_for(s) for s in source_ids]
        rows = [[st] + list(o) for st, o in zip(starts, outputs_prefix)]
        return pad_rows(rows, device), pad_rows(source_ids, device)

    def logits(self, module, source_ids, output_ids, device):
        """Teacher-forced logits [B,T,V] (position t predicts output_ids[b][t]) and mask [B,T]."""
        ids, source = self._inputs(source_ids, [o[:-1] for o in output_ids], device)
        logits = module(ids, source)  # [B,L,V]
        width = max([len(o) for o in output_ids] + [1])
        if logits.shape[1] < width:  # every output of length <= 1
            logits = torch.nn.functional.pad(logits, (0, 0, 0, width - logits.shape[1]))
        mask = torch.arange(width, device=device)[None, :] < torch.tensor([len(o) for o in output_ids], device=device)[:, None]
        return logits[:, :width], mask

    @torch.no_grad()
    def sample(self, source_ids, max_new_tokens, device) -> List[List[int]]:
        outputs: List[List[int]] = [[] for _ in source_ids]
        for _ in range(max_new_tokens):
            ids, source = self._inputs(source_ids, outputs, device)
            logits = self.module(ids, source)
            last = torch.tensor([len(o) for o in outputs], device=device)
            step = logits[torch.arange(len(outputs), device=device), last].float()
            for row, token in enumerate(torch.multinomial(step.softmax(-1), 1)[:, 0].tolist()):
                outputs[row].append(token)
        return outputs

    def state_dict(self):
        return self.module.state_dict()


class NeuralDrafter(Drafter):
    """Base of CNNDrafter / LSTMDrafter. Subclasses set ``kind``, ``model_class`` and implement
    ``_draft(seq, lens, gamma, sampling, prev)`` (native runtime or its Python twin)."""

    kind = ""
    model_class = None
    deterministic = False  # greedy targets: argmax drafts, probs None; sampling: q returned

    def __init__(self, model: TokenModel, *, start_token_id: Optional[int] = None, use_native: bool = True):
        self.model = model.eval()
        self.vocab_size = model.vocab_size
        self.start_token_id = start_token_id  # seq2seq decoder start; None: the last source token
        self.use_native = bool(use_native)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target: nn.Module, *, start_token_id: Optional[int] = None, **model_kwargs):
        """A drafter sharing the target's vocabulary, embeddings initialised from the target's."""
        weight = target.get_input_embeddings().weight
        vocab = target.get_output_embeddings().weight.shape[0] if target.get_output_embeddings() is not None else weight.shape[0]
        model = cls.model_class(vocab_size=vocab, embed_dim=weight.shape[1], **model_kwargs)
        model.init_from_target(target)
        if start_token_id is None and target.config.is_encoder_decoder:
            start_token_id = int(target.config.decoder_start_token_id)
        return cls(model, start_token_id=start_token_id)

    def start_for(self, source: Sequence[int]) -> int:
        if self.start_token_id is not None:
            return int(self.start_token_id)
        return int(source[-1]) if len(source) else 0

    # ------------------------------------------------------------------ protocol
    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        if request.vocab_size != self.vocab_size:
            raise ValueError(f"drafter vocabulary {self.vocab_size} != target vocabulary {request.vocab_size}")
        self._device = self.model.embed.weight.device
        source, source_len = request_source(request)
        self._source = source.to(self._device)  # [B,S] left-aligned, -1 padded
        if request.is_encoder_decoder:
            start = request.decoder_start_token_id if request.decoder_start_token_id is not None else self.start_token_id
            self._starts = torch.full((source.shape[0],), int(start or 0), dtype=torch.long, device=self._device)
        else:  # causal: the prompt's last token starts the drafter sequence (as in training)
            last = source.gather(1, (source_len - 1).clamp(min=0)[:, None])[:, 0].clamp(min=0)
            self._starts = last.to(self._device)
        self._generator = request.generator
        with torch.no_grad():
            self._condition()

    def _condition(self) -> None:
        """Per-request source conditioning (subclasses)."""

    def sequences(self, step: DraftStep) -> Tuple[torch.Tensor, torch.Tensor]:
        """[start]+generated per row: (seq [B,1+G] -1 padded, lens [B])."""
        gen = step.generated.long().to(self._device)
        num = step.num_generated.long().to(self._device)
        seq = torch.full((num.shape[0], 1 + gen.shape[1]), -1, dtype=torch.long, device=self._device)
        seq[:, 0] = self._starts
        valid = torch.arange(gen.shape[1], device=self._device)[None, :] < num[:, None]
        seq[:, 1:] = torch.where(valid, gen, -1)
        return seq, num + 1

    @property
    def native(self) -> bool:
        return self.use_native and ops.native_available()

    def draft(self, step: DraftStep) -> DraftOutput:
        """γ tokens per row in one runtime call (native, or the Python twin): greedy argmax, or
        sampled from q = the target's processing of the drafter's logits (q returned)."""
        seq, lens = self.sequences(step)
        sampling = self.request.sampling if self.request.sampling.do_sample else None
        # repetition penalty context: [start] + generated (-1 padded), then the drafts
        prev = seq if sampling is not None else None
        with torch.no_grad():
            tokens, scores = self._draft(seq, lens, int(step.gamma), sampling, prev)
        return DraftOutput(tokens=tokens, probs=scores if sampling is not None else None)

    # ------------------------------------------------------------------ training
    def student(self) -> NeuralStudent:
        return NeuralStudent(self)

    def fit(self, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], *, max_steps: int = 200,
            batch_size: int = 16, lr: float = 3e-3, seed: int = 0, progress: bool = False, **config):
        """Cross-entropy training on (source, output) pairs with fastspec.distill.Trainer."""
        from fastspec.distill.trainer import TrainConfig, Trainer, TrainItem

        items = [TrainItem(index=i, source_ids=list(s), reference_ids=list(o)) for i, (s, o) in enumerate(zip(sources, outputs))]
        train_config = TrainConfig(drafter=self.kind, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                                   progress=progress, ckpt_every=0, **config)
        self.model.train()
        try:
            result = Trainer(self.student(), items, train_config).train()
        finally:
            self.model.eval()
        return result

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        config = {"model": self.model.config_dict(), "start_token_id": self.start_token_id}
        save_folder(folder, self.kind, config, self.model.state_dict())

    @classmethod
    def load(cls, folder: str, **kwargs):
        config, tensors = load_folder(folder, cls.kind)
        try:
            model = cls.model_class(**config["model"])
            model.load_state_dict(tensors, strict=True)
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"corrupted {cls.kind} drafter in {folder!r}: {type(e).__name__}: {e}") from None
        return cls(model, start_token_id=config.get("start_token_id"), **kwargs)
