"""Shortlisted drafter heads (EAGLE-3's draft vocabulary), shared by the CNN/LSTM drafters
(:class:`fastspec.drafters.neural.TokenModel`) and the feature drafter.

A head of N rows scores N target ids: ``ids`` [N] int64 is the draft → target map (row i scores
target id ``ids[i]``), built from training-label frequencies by
:func:`fastspec.distill.feature_data.build_shortlist`. Drafted tokens are always target ids:
greedy takes the argmax row and maps it; sampling places the N logits on the full vocabulary
(−inf elsewhere) before the target's processing, so q is [.., V] with zeros outside the shortlist
and speculative sampling stays exact (DESIGN §7).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from fastspec.errors import UserError


def check_shortlist(ids: Union[torch.Tensor, Sequence[int]], vocab_size: int) -> torch.Tensor:
    """[N] int64 distinct target ids in [0, vocab_size) (1 ≤ N ≤ V); raises UserError otherwise."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1:
        raise UserError(f"a shortlist is a 1-D sequence of target ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or ids.numel() > vocab_size:
        raise UserError(f"a shortlist must hold 1..{vocab_size} target ids, got {ids.numel()}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise UserError(f"a shortlist holds integer target ids, got {ids.dtype}")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise UserError(f"shortlist ids must lie in [0, {vocab_size}); got min {int(ids.min())}, max {int(ids.max())}")
    if ids.unique().numel() != ids.numel():
        raise UserError("shortlist ids must be distinct target ids")
    return ids


def draft_index(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] int64: target id → its head row (draft id), −1 outside the shortlist."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=ids.device)
    index[ids] = torch.arange(ids.numel(), device=ids.device)
    return index


def to_vocab(short_logits: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """short_logits [..., N] → float32 logits [..., V], −inf outside the shortlist (the native
    runtime's ``index_copy_`` of the same values)."""
    full = torch.full((*short_logits.shape[:-1], vocab_size), float("-inf"), device=short_logits.device)
    full[..., ids] = short_logits.float()
    return full


__all__ = ["check_shortlist", "draft_index", "to_vocab"]
