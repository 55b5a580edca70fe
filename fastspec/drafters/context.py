"""Row bookkeeping shared by the drafters: compact sources and per-row contexts.

The engine hands drafters padded tensors (``DraftRequest.source_ids`` with any padding side,
``DraftStep.generated`` right-padded with -1). Drafters want, per row, the real tokens only:

* the **source**: the encoder input (seq2seq) or the prompt (causal), left-aligned;
* the **sequence** a decoder-side model reads: ``decoder prompt + generated`` (seq2seq: the
  caller's ``decoder_input_ids``, else the start token) or ``prompt + generated`` (causal) --
  exactly the target's own decoder/causal input.
"""
from __future__ import annotations

from typing import Tuple

import torch

from fastspec.drafters.base import DraftRequest, DraftStep


def left_align(ids: torch.Tensor, mask: torch.Tensor, pad: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real tokens of each row moved to the front.

    Args:
        ids: [B,S] int64; mask: [B,S] (nonzero = real), any padding side.
    Returns:
        (tokens [B,S] with ``pad`` after each row's real tokens, lengths [B] int64)
    """
    mask = mask.bool()
    order = torch.argsort((~mask).long(), dim=1, stable=True)  # real tokens first, in order
    lengths = mask.sum(-1).long()
    aligned = ids.long().gather(1, order)
    columns = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(columns < lengths[:, None], aligned, pad), lengths


def right_to_left_pad(tokens: torch.Tensor, lengths: torch.Tensor, width: int, pad: int = -1) -> torch.Tensor:
    """The last ``width`` tokens of each left-aligned row, left-padded with ``pad``.

    Args:
        tokens: [B,T] left-aligned rows; lengths: [B] valid lengths.
    Returns:
        [B,width]: row b ends with tokens[b, lengths[b]-1].
    """
    index = lengths[:, None] - width + torch.arange(width, device=tokens.device)  # [B,width]
    gathered = tokens.gather(1, index.clamp(min=0, max=max(tokens.shape[1] - 1, 0))) if tokens.shape[1] else None
    if gathered is None:
        return torch.full((tokens.shape[0], width), pad, dtype=torch.long, device=tokens.device)
    return torch.where(index >= 0, gathered, pad)


def request_source(request: DraftRequest) -> Tuple[torch.Tensor, torch.Tensor]:
    """(source [B,S] left-aligned, -1 padded; lengths [B]) of a request."""
    mask = request.source_mask if request.source_mask is not None else torch.ones_like(request.source_ids)
    return left_align(request.source_ids, mask)


def decoder_prefix(request: DraftRequest, source=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prefix [B,P] left-aligned, -1 padded; lengths [B]) each row's output follows: the seq2seq
    decoder prompt (else the start token) or the causal prompt (``source``: a precomputed
    ``request_source(request)``)."""
    if request.is_encoder_decoder and request.decoder_prompt_ids is not None:
        mask = request.decoder_prompt_mask
        return left_align(request.decoder_prompt_ids,
                          torch.ones_like(request.decoder_prompt_ids) if mask is None else mask)
    if request.is_encoder_decoder:
        start = request.decoder_start_token_id if request.decoder_start_token_id is not None else 0
        return (torch.full((request.batch_size, 1), int(start), dtype=torch.long),
                torch.ones(request.batch_size, dtype=torch.long))
    return source if source is not None else request_source(request)


def decoder_sequences(request: DraftRequest, step: DraftStep, source=None, extra: int = 0):
    """The target's own input sequence per row: decoder prompt + generated (seq2seq; the start
    token when the request has no decoder prompt) or prompt + generated (causal).

    Args:
        source: the precomputed ``request_source(request)`` (causal only).
        extra: free columns appended at the end (for drafts).
    Returns:
        (seq [B, W+extra] left-aligned, -1 padded; lengths [B]) on the generated tensor's device.
    """
    generated = step.generated.long()
    num = step.num_generated.long().to(generated.device)
    batch = num.shape[0]
    prefix, prefix_len = decoder_prefix(request, source)
    prefix, prefix_len = prefix.to(generated.device), prefix_len.to(generated.device)
    lengths = prefix_len + num
    width = int(lengths.max()) if batch else 0
    seq = torch.full((batch, width + extra), -1, dtype=torch.long, device=generated.device)
    seq[:, : prefix.shape[1]] = prefix
    if generated.shape[1] > 0:
        columns = prefix_len[:, None] + torch.arange(generated.shape[1], device=generated.device)  # [B,G]
        valid = torch.arange(generated.shape[1], device=generated.device) < num[:, None]
        rows = torch.arange(batch, device=generated.device)[:, None].expand_as(columns)
        seq[rows[valid], columns[valid]] = generated[valid]
    return seq, lengths


def place_drafts(seq: torch.Tensor, lengths: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """Write drafts [B,k] after each row's real tokens: seq[b, lengths[b] + i] = drafts[b, i]."""
    index = lengths[:, None] + torch.arange(drafts.shape[1], device=seq.device)
    out = seq.clone()
    out.scatter_(1, index, drafts)
    return out
