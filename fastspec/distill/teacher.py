"""Teacher-forced logits of a HF model (the target, or an HF drafter) on given outputs.

Works for seq2seq (encoder source, decoder starts at ``decoder_start_token_id``) and for
causal models (prompt and output concatenated per row). Everything else in distill/ goes
through here, so both model kinds are handled in one place.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastspec import introspect


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    """Lists of ids -> (ids [B,L] int64, mask [B,L] int64), right padded."""
    return _pad(seqs, pad_id, device, left=False)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    """Lists of ids -> (ids [B,L], mask [B,L]), left padded (causal generation)."""
    return _pad(seqs, pad_id, device, left=True)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device, left: bool):
    longest = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(longest, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        if len(seq):
            start = longest - len(seq) if left else 0
            ids[row, start : start + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, start : start + len(seq)] = 1
    return ids.to(device), mask.to(device)


def teacher_forced_logits(
    model,
    source_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    device=None,
) -> tuple:
    """Logits that predict each output token given the source and the output prefix.

    source_ids / output_ids: per-row token lists (no padding).
    Returns (logits [B,T,V] float, mask [B,T] bool) with T = the longest output; row b's
    position t predicts output_ids[b][t].
    """
    device = device if device is not None else introspect.model_device(model)
    pad = introspect.pad_token_id(model)
    out_ids, out_mask = pad_right(output_ids, pad, device)  # [B,T]
    if introspect.is_encoder_decoder(model):
        src, src_mask = pad_right(source_ids, pad, device)  # [B,S]
        start = introspect.decoder_start_token_id(model)
        dec_in = torch.cat([torch.full_like(out_ids[:, :1], start), out_ids[:, :-1]], dim=1)  # [B,T]
        dec_mask = torch.cat([torch.ones_like(out_mask[:, :1]), out_mask[:, :-1]], dim=1)
        logits = model(
            input_ids=src, attention_mask=src_mask, decoder_input_ids=dec_in, decoder_attention_mask=dec_mask
        ).logits  # [B,T,V]
        return logits, out_mask.bool()
    # causal: prompts left padded, so every row's outputs sit in the same columns and the LM head
    # (often most of a small model's cost) runs only there (logits_to_keep), not over the prompts
    if any(len(s) == 0 for s in source_ids):
        raise ValueError("causal teacher forcing needs a non-empty prompt in every row")
    src, src_mask = pad_left(source_ids, pad, device)  # [B,S]
    ids, mask = torch.cat([src, out_ids], dim=1), torch.cat([src_mask, out_mask], dim=1)  # [B,S+T]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = torch.arange(src.shape[1] - 1, src.shape[1] - 1 + out_ids.shape[1], device=device)  # [T]
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: all positions, then the output columns
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, keep]
    return logits, out_mask.bool()  # [B,T,V], [B,T]
