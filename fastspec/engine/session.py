"""The target side of a request: the encoder once (seq2seq) or the prompt prefill (causal), then
forwards over each row's pending + new tokens on one cache shared by the rows.

Row b keeps ``cached[b]`` of its real tokens in the cache; its tokens past ``cached[b]`` are
*pending*: committed, but without KV (the causal prefill stops at the earliest row's last token;
a seq2seq row's first decoder block). The next block of row b is ``[pending_b, last_b, drafts_b]``
right-padded to a common width: padding at the END of a block is harmless under causal
self-attention, and each row's logits are read at its own positions.

Two cache layouts, chosen per target:
- **ragged** (causal targets that take ``position_ids``): after a block every row keeps the KV of
  all its committed tokens but the newest, so pending is empty after the first block. A row that
  accepted fewer tokens than another leaves *holes*: columns masked out by ``kv_mask`` [b,L], which
  the attention mask carries (as vLLM keeps a length per sequence). Positions come from
  ``cached``, not from the column. When holes pass half the cache it is compacted.
- **rectangular** (seq2seq, whose relative position bias reads the column index, and causal targets
  without ``position_ids``): the cache is cropped to the shortest row; the rest becomes pending.
Beam search uses the same session: its beams are rows, reordered with :meth:`select`.

Features (only for a drafter with ``hidden_state_layers``; see ``fastspec.drafters.base``): the
prefill and the verify forwards then return the selected hidden states, and :meth:`take_features`
hands each row's positions ``[handed, seq_len − 1)`` once, in order. The causal prefill's real
positions are kept right-aligned ("carry") just before the first block, so one index maps a
row's sequence position to the stream ``cat([carry, block])``.
"""
from __future__ import annotations

import inspect
import time
from typing import Optional, Tuple

import torch

from fastspec import introspect
from fastspec.cache import (cache_kwarg, cache_length, crop_cache, gather_cache_columns, new_cache, select_cache_rows,
                            supports_holes)
from fastspec.engine.inputs import Request
from fastspec.errors import UserError


def hand_features(features: torch.Tensor, origin: torch.Tensor, handed: torch.Tensor,
                  seq_len: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows' features of positions [handed, seq_len − 1): (hidden [b,K,H'] left-aligned, zero padded;
    num [b]). features: [b,W,H'] a stream whose index j holds position origin[b] + j."""
    num = seq_len - 1 - handed  # [b]
    width = int(num.max()) if num.numel() else 0
    columns = torch.arange(width, device=features.device)
    valid = columns < num[:, None]
    index = torch.where(valid, handed[:, None] - origin[:, None] + columns, 0)
    hidden = features.gather(1, index[:, :, None].expand(-1, -1, features.shape[-1]))
    return torch.where(valid[:, :, None], hidden, torch.zeros((), dtype=hidden.dtype, device=features.device)), num


class Stopwatch:
    """Wall time of device work. Synchronises CUDA around a timed call only when asked
    (``sync_timing``): otherwise the loop keeps no host syncs beyond its own."""

    def __init__(self, device: torch.device, sync: bool):
        self.device = device
        self.sync = bool(sync) and device.type == "cuda"

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class TargetSession:
    """The target's cache for the rows still running ("compact" rows).

    rows: [b] original row index of each compact row; cached: [b] real tokens in the cache.
    kv_mask: [b,L] 1 where a cache column holds a real token of the row (causal targets only).
    """

    # compact a ragged cache once the fullest row's holes pass both of these (amortises the copy)
    COMPACT_MIN_HOLES = 32
    COMPACT_HOLE_FRACTION = 1.0  # of that row's cached tokens

    def __init__(self, model, request: Request, stopwatch: Stopwatch, feature_layers: Optional[tuple] = None,
                 inplace_cache: bool = True):
        self.model = model
        self.feature_layers = tuple(int(i) for i in feature_layers) if feature_layers else None
        self.features: Optional[torch.Tensor] = None  # [b,W',H'] the last block's stream (+ the carry)
        self.feature_origin: Optional[torch.Tensor] = None  # [b] sequence position of stream index 0
        self.carry: Optional[torch.Tensor] = None  # [b,P,H'] prefill features, right-aligned
        self.handed = torch.zeros(request.batch, dtype=torch.long, device=introspect.model_device(model))
        self.is_seq2seq = introspect.is_encoder_decoder(model)
        self.device = introspect.model_device(model)
        self.stopwatch = stopwatch
        self.cache = new_cache(model, inplace_cache)
        self.calls, self.time_s = 0, 0.0  # every target forward
        self.verify_calls, self.verify_time_s = 0, 0.0  # decode-step forwards only
        self.block_start = 0  # cache length before the last block
        self.rows = torch.arange(request.batch, device=self.device)
        parameters = inspect.signature(model.forward).parameters
        self.cache_kw = cache_kwarg(model)
        self.keep_logits = "logits_to_keep" in parameters
        self.takes_positions = "position_ids" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
        self.ragged = not self.is_seq2seq and self.takes_positions and supports_holes(self.cache)
        if self.is_seq2seq:
            self.encoder_mask = request.encoder_inputs.get("attention_mask")  # [B,S] or None (Whisper)
            self.encoder_outputs = self._timed(model.get_encoder(), return_dict=True, **request.encoder_inputs)
            self.kv_mask = None
            self.cached = torch.zeros(request.batch, dtype=torch.long, device=self.device)
        else:
            self._prefill(request.prompt, request.prompt_mask)

    def _timed(self, fn, verify: bool = False, **kwargs):
        start = self.stopwatch.now()
        with torch.no_grad():
            out = fn(**kwargs)
        elapsed = self.stopwatch.now() - start
        self.calls += 1
        self.time_s += elapsed
        if verify:
            self.verify_calls += 1
            self.verify_time_s += elapsed
        return out

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Cache every prompt column before the earliest "last real token" of any row; real tokens
        after it stay pending (ids, mask: [B,S], any padding side)."""
        if not self.takes_positions and bool((mask == 0).any()):
            raise UserError(f"{type(self.model).__name__} takes no position_ids, so padded batches are unsupported")
        columns = torch.arange(ids.shape[1], device=self.device)
        prefill = int(torch.where(mask.bool(), columns, -1).amax(-1).min())
        self.kv_mask = mask[:, :prefill].clone()  # [B,P]
        self.cached = self.kv_mask.sum(-1).long()  # [B]
        if prefill > 0:
            kwargs = {"logits_to_keep": 1} if self.keep_logits else {}
            if self.takes_positions:
                kwargs["position_ids"] = (self.kv_mask.cumsum(-1) - 1).clamp(min=0)
            if self.feature_layers:
                kwargs["output_hidden_states"] = True
            out = self._timed(self.model, input_ids=ids[:, :prefill], attention_mask=self.kv_mask, use_cache=True,
                              **{self.cache_kw: self.cache}, **kwargs)
            if self.feature_layers:  # real columns right-aligned: pads first, then the row's tokens in order
                order = torch.argsort(self.kv_mask.to(torch.int8), dim=1, stable=True)
                hidden = self._select_layers(out)
                self.carry = hidden.gather(1, order[:, :, None].expand(-1, -1, hidden.shape[-1]))

    def _select_layers(self, out) -> torch.Tensor:
        """The selected hidden states of a forward's output, concatenated: [b,W,H']."""
        states = out.decoder_hidden_states if self.is_seq2seq else out.hidden_states
        return torch.cat([states[i] for i in self.feature_layers], dim=-1).to(self.device)

    @property
    def encoder_hidden_states(self) -> Optional[torch.Tensor]:
        """[B,S,H] the encoder's last hidden state (seq2seq with features wanted), else None."""
        if not (self.is_seq2seq and self.feature_layers):
            return None
        return self.encoder_outputs.last_hidden_state

    def take_features(self, seq_len: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """After a block's commit: (hidden [b,K,H'], num [b]) = each compact row's features of
        positions [handed, seq_len − 1), which the last block computed (see :func:`hand_features`)."""
        out = hand_features(self.features, self.feature_origin, self.handed, seq_len)
        self.handed = seq_len - 1
        return out

    @property
    def length(self) -> int:
        return cache_length(self.cache)

    def forward(self, seq: torch.Tensor, seq_len: torch.Tensor, num_positions: int) -> torch.Tensor:
        """Logits [b,num_positions,V] in the model's dtype (no float32 copy: the verify ops upcast
        inside) on the session's device, read after each compact row's last committed token and
        its drafts. With features wanted, also keeps the block's hidden states for :meth:`take_features`.

        seq: [b,T] each row's real tokens left-aligned, then its num_positions-1 drafts.
        seq_len: [b] committed tokens per row (drafts start at seq_len).
        """
        first_index = seq_len - 1 - self.cached  # [b] block index of the last committed token
        width = int(first_index.max()) + num_positions
        index = (self.cached[:, None] + torch.arange(width, device=self.device)).clamp(max=seq.shape[1] - 1)
        block = seq.gather(1, index)  # [b,W]
        if self.is_seq2seq:
            kwargs = dict(encoder_outputs=self.encoder_outputs, decoder_input_ids=block)
            if self.encoder_mask is not None:
                kwargs["attention_mask"] = self.encoder_mask
        else:
            ones = torch.ones(block.shape[0], width, dtype=self.kv_mask.dtype, device=self.device)
            kwargs = dict(input_ids=block, attention_mask=torch.cat([self.kv_mask, ones], dim=1))  # [b,L+W]
            if self.takes_positions:
                kwargs["position_ids"] = self.cached[:, None] + torch.arange(width, device=self.device)  # [b,W]
            if self.keep_logits:
                kwargs["logits_to_keep"] = width - int(first_index.min())
        if self.feature_layers:
            kwargs["output_hidden_states"] = True
        self.block_start = self.length
        out = self._timed(self.model, verify=True, use_cache=True, **{self.cache_kw: self.cache}, **kwargs)
        if self.feature_layers:
            self._keep_features(self._select_layers(out))
        logits = out.logits.to(self.device)  # device_map: the head may sit on another device
        index = first_index - (width - logits.shape[1])  # logits_to_keep trimmed the front
        if bool((index == index[0]).all()):
            start = int(index[0])
            return logits[:, start : start + num_positions]
        gather = (index[:, None] + torch.arange(num_positions, device=self.device))[:, :, None]
        return logits.gather(1, gather.expand(-1, -1, logits.shape[-1]))

    def _keep_features(self, block: torch.Tensor) -> None:
        """block [b,W,H']: hidden states of positions cached[b] + [0, W); the prefill's carry (first
        block only) goes in front."""
        if self.carry is not None:
            block = torch.cat([self.carry.to(block.dtype), block], dim=1)
            self.feature_origin = self.cached - self.carry.shape[1]
            self.carry = None
        else:
            self.feature_origin = self.cached.clone()
        self.features = block

    def advance(self, seq_len: torch.Tensor) -> None:
        """After a block, keep for every row the KV of all its committed tokens but the newest: all
        of them (ragged), or as many as the shortest row has (rectangular; the rest becomes
        pending). seq_len: [b] committed."""
        keep = seq_len - 1 - self.cached  # [b] block columns that hold committed tokens
        width = int(keep.max() if self.ragged else keep.min())
        keep = keep.clamp(max=width)  # rectangular: every row keeps the shortest row's count
        crop_cache(self.cache, self.block_start + width)
        if self.kv_mask is not None:
            kept = torch.arange(width, device=self.device) < keep[:, None]  # [b,width]
            self.kv_mask = torch.cat([self.kv_mask, kept.to(self.kv_mask.dtype)], dim=1)
        self.cached = self.cached + keep
        if self.ragged:
            self._compact_if_sparse()

    def _compact_if_sparse(self) -> None:
        """Move every row's cached columns to the front, in order, once the fullest row's holes
        outnumber its tokens (bounds attention over the holes; amortised over many steps)."""
        longest = int(self.cached.max())
        if self.length - longest <= max(self.COMPACT_HOLE_FRACTION * longest, self.COMPACT_MIN_HOLES):
            return
        order = torch.argsort(1 - self.kv_mask.to(torch.int8), dim=1, stable=True)[:, :longest]  # [b,longest]
        gather_cache_columns(self.cache, order)
        self.kv_mask = (torch.arange(longest, device=self.device) < self.cached[:, None]).to(self.kv_mask.dtype)

    def add_counts(self, metrics) -> None:
        """Add this session's forward counts and times to a GenerationMetrics."""
        metrics.target_calls += self.calls
        metrics.target_time_s += self.time_s
        metrics.verify_calls += self.verify_calls
        metrics.verify_time_s += self.verify_time_s

    def select(self, index: torch.Tensor) -> None:
        """Keep compact rows ``index`` [b'] int64, in that order (drop finished rows, reorder or
        repeat beams)."""
        select_cache_rows(self.cache, index)
        self.rows = self.rows[index]
        self.cached = self.cached[index]
        self.handed = self.handed[index]
        if self.carry is not None:
            self.carry = self.carry[index]
        if self.is_seq2seq:
            self.encoder_outputs.last_hidden_state = self.encoder_outputs.last_hidden_state[index]
            if self.encoder_mask is not None:
                self.encoder_mask = self.encoder_mask[index]
        else:
            self.kv_mask = self.kv_mask[index]
