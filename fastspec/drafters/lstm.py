"""LSTMDrafter: a small UNIDIRECTIONAL LSTM LM sharing the target's vocabulary.

The seed's LSTM was bidirectional and trained on unshifted labels (it saw the answer); this one
is causal and trained on shifted labels. The source conditions the initial hidden state
(tanh of a projection of the mean source embedding), once per request.

State and rollback: the drafter keeps (h, c) after the committed tokens but the last one. A draft
feeds the last token and γ drafts in ONE native call (``torch.ops.fastspec.lstm_draft_greedy``),
which also returns the γ+1 intermediate states; ``commit`` with a accepted drafts keeps state a.
If the engine (or an ensemble) skips a commit, ``draft`` notices that its consumed tokens are not
a prefix of the row any more and catches up, so the drafts never depend on the call pattern.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from fastspec.drafters.neural import NeuralDrafter, TokenModel, choose_tokens, native_choice_kwargs


class LSTMLM(TokenModel):
    """embed (+proj) -> L-layer unidirectional LSTM (h0 from the source) -> head."""

    def __init__(self, vocab_size: int, embed_dim: int, dim: int = 256, hidden_size: int = 256, num_layers: int = 1,
                 shortlist_size: Optional[int] = None):
        super().__init__(vocab_size, embed_dim, dim, shortlist_size)
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.src_to_h = nn.Linear(self.embed_dim, self.num_layers * self.hidden_size)
        self.lstm = nn.LSTM(self.dim, self.hidden_size, self.num_layers, batch_first=True)
        self.head = self.make_head(self.hidden_size)  # [N or V, hidden_size]

    def config_dict(self) -> dict:
        return dict(self.base_config(), hidden_size=self.hidden_size, num_layers=self.num_layers)

    def initial_state(self, source: torch.Tensor):
        """source [B,S] (-1 pad) -> (h0, c0) each [L,B,H]."""
        h0 = torch.tanh(self.src_to_h(self.pooled_source(source)))  # [B,L·H]
        h0 = h0.view(-1, self.num_layers, self.hidden_size).transpose(0, 1).contiguous()
        return h0, torch.zeros_like(h0)

    def forward(self, ids: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """ids [B,L] right-padded -1 (causal: pads only follow real tokens), source [B,S] -> head logits [B,L,N]
        (N = V for a full head)."""
        out, _ = self.lstm(self.embed_tokens(ids), self.initial_state(source))
        return self.head(out)

    def weights(self):
        """Per-layer (w_ih, w_hh, b_ih, b_hh) in PyTorch's gate order i, f, g, o."""
        return [
            [getattr(self.lstm, f"{name}_l{layer}") for layer in range(self.num_layers)]
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]

    def cell_step(self, token: torch.Tensor, h: List[torch.Tensor], c: List[torch.Tensor]):
        """One token [B] through every layer (same op order as the native runtime); returns top h [B,H].
        An int8 LSTM (:func:`fastspec.drafters.io.quantize_drafter`) has packed weights: it runs the
        quantized module itself for the step."""
        x = self.embed_tokens(token)
        if not isinstance(self.lstm, nn.LSTM):  # torch.ao dynamic quantized LSTM
            out, (h_new, c_new) = self.lstm(x[:, None], (torch.stack(h, 0), torch.stack(c, 0)))
            h[:], c[:] = list(h_new.unbind(0)), list(c_new.unbind(0))
            return out[:, 0]
        w_ih, w_hh, b_ih, b_hh = self.weights()
        for layer in range(self.num_layers):
            gates = F.linear(x, w_ih[layer], b_ih[layer]) + F.linear(h[layer], w_hh[layer], b_hh[layer])  # [B,4H]
            i, f, g, o = gates.chunk(4, 1)
            c[layer] = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
            h[layer] = torch.sigmoid(o) * torch.tanh(c[layer])
            x = h[layer]
        return x


def lstm_draft_reference(model: LSTMLM, last: torch.Tensor, h: torch.Tensor, c: torch.Tensor, gamma: int,
                         sampling=None, prev_tokens=None, generator=None):
    """Python twin of the native loop. last [B], h/c [L,B,H] -> (tokens [B,γ] (target ids), head logits
    [B,γ,N] (greedy) or q [B,γ,V] (sampling), h_all [γ+1,L,B,H], c_all [γ+1,L,B,H]); sampling as in
    cnn_draft_reference."""
    hs, cs = list(h.unbind(0)), list(c.unbind(0))
    tokens, logits_all, h_all, c_all = [], [], [], []
    feed, prev = last, prev_tokens
    for step in range(gamma + 1):
        top = model.cell_step(feed, hs, cs)
        h_all.append(torch.stack(hs, 0))
        c_all.append(torch.stack(cs, 0))
        if step == gamma:
            break
        logits = model.head(top)  # the module: an int8 head works too
        feed, scores, prev = choose_tokens(model, logits, sampling, prev, generator)
        tokens.append(feed)
        logits_all.append(scores)
    return torch.stack(tokens, 1), torch.stack(logits_all, 1), torch.stack(h_all, 0), torch.stack(c_all, 0)


def lstm_draft_native(model: LSTMLM, last: torch.Tensor, h: torch.Tensor, c: torch.Tensor, gamma: int,
                      sampling=None, prev_tokens=None, generator=None):
    """The γ-step loop in one native call (same maths as :func:`lstm_draft_reference`)."""
    proj = model.in_proj
    w_ih, w_hh, b_ih, b_hh = model.weights()
    return torch.ops.fastspec.lstm_draft(
        last, h, c, model.embed.weight, proj.weight if proj is not None else None,
        proj.bias if proj is not None else None, w_ih, w_hh, b_ih, b_hh, model.head.weight, model.head.bias, int(gamma),
        **native_choice_kwargs(model, sampling, prev_tokens, generator),
    )


class LSTMDrafter(NeuralDrafter):
    """Causal LSTM drafter with a recurrent state rolled back on commit."""

    kind = "lstm"
    model_class = LSTMLM

    def _condition(self) -> None:
        self._h0, self._c0 = self.model.initial_state(self._source)  # [L,B,H]
        self._h, self._c = self._h0.clone(), self._c0.clone()
        batch = self._source.shape[0]
        self._consumed = torch.full((batch, 0), -1, dtype=torch.long, device=self._device)  # tokens in the state
        self._num_consumed = torch.zeros(batch, dtype=torch.long, device=self._device)
        self._pending = None

    def _sync(self, seq: torch.Tensor, lens: torch.Tensor) -> None:
        """Make the state hold exactly seq[b, :lens[b]-1] for every row (reset rows that diverged)."""
        n = self._num_consumed
        width = min(self._consumed.shape[1], seq.shape[1])
        agree = (self._consumed[:, :width] == seq[:, :width]).long().cumprod(1).sum(1)  # [B]
        ok = (n <= lens - 1) & (agree >= n)
        if not bool(ok.all()):
            reset = ~ok
            self._h[:, reset], self._c[:, reset] = self._h0[:, reset], self._c0[:, reset]
            n = torch.where(reset, 0, n)
        behind = lens - 1 - n  # tokens still to feed per row
        for k in range(int(behind.max()) if behind.numel() else 0):
            feeding = k < behind  # [B]
            column = (n + k).clamp(max=seq.shape[1] - 1)
            token = seq.gather(1, column[:, None])[:, 0].clamp(min=0)
            hs, cs = list(self._h.unbind(0)), list(self._c.unbind(0))
            self.model.cell_step(token, hs, cs)
            keep = feeding[None, :, None]
            self._h = torch.where(keep, torch.stack(hs, 0), self._h)
            self._c = torch.where(keep, torch.stack(cs, 0), self._c)
        self._consumed = torch.where(torch.arange(seq.shape[1], device=seq.device) < (lens - 1)[:, None], seq, -1)
        self._num_consumed = lens - 1

    def _last(self, seq, lens):
        return seq.gather(1, (lens - 1)[:, None])[:, 0]

    def _draft(self, seq, lens, gamma, sampling, prev):
        self._sync(seq, lens)
        run = lstm_draft_native if self.native else lstm_draft_reference
        tokens, scores, h_all, c_all = run(self.model, self._last(seq, lens), self._h, self._c, gamma, sampling, prev,
                                           self._generator)
        self._pending = (seq, lens, tokens, h_all, c_all)
        return tokens, scores

    def commit(self, info) -> None:
        """Keep the state after the accepted drafts (rows whose verified tokens were ours)."""
        if self._pending is None:
            return
        seq, lens, tokens, h_all, c_all = self._pending
        self._pending = None
        accepted = info.num_accepted.to(self._device).long()
        out = info.output_tokens.to(self._device).long()
        gamma = tokens.shape[1]
        position = torch.arange(gamma, device=self._device)
        ours = ((out[:, :gamma] == tokens) | (position[None, :] >= accepted[:, None])).all(1)
        rows = (info.active.to(self._device) & ours & (accepted <= gamma)).nonzero().flatten()
        if rows.numel() == 0:
            return
        a = accepted[rows]
        self._h[:, rows] = h_all[a, :, rows].transpose(0, 1)  # [L,r,H]
        self._c[:, rows] = c_all[a, :, rows].transpose(0, 1)
        width = int((lens[rows] + a).max())
        consumed = torch.full((seq.shape[0], max(width, self._consumed.shape[1])), -1, dtype=torch.long, device=self._device)
        consumed[:, : self._consumed.shape[1]] = self._consumed
        index = (lens[rows, None] - 1 + torch.arange(gamma + 1, device=self._device))  # last real token + drafts
        drafts_and_last = torch.cat([seq.gather(1, (lens - 1)[:, None]), tokens], dim=1)[rows]  # [r,γ+1]
        valid = torch.arange(gamma + 1, device=self._device)[None, :] <= a[:, None]
        consumed[rows[:, None].expand_as(index)[valid], index[valid]] = drafts_and_last[valid]
        self._consumed = consumed
        self._num_consumed[rows] = lens[rows] + a


__all__ = ["LSTMDrafter", "LSTMLM", "lstm_draft_reference", "lstm_draft_native"]
