"""Autoregressive beam search: a port of HF generate()'s vectorised beam search (5.x), with HF's
scoring, length penalty, early stopping and stopping rules, so the sequences equal
``model.generate(num_beams=...)``.

It runs on the same :class:`~fastspec.engine.session.TargetSession` as the speculative loop
(every beam is a session row, reordered with ``select``) and the same logits processors.
"""
from __future__ import annotations

import torch

from fastspec import introspect, ops
from fastspec.drafters.context import left_align
from fastspec.engine.config import Settings
from fastspec.engine.inputs import Request
from fastspec.engine.processors import LogitsProcessors, context_tokens
from fastspec.engine.session import Stopwatch, TargetSession
from fastspec.metrics import GenerationMetrics


def _gather_beams(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [B,K,...], index [B,K'] -> [B,K',...]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam_scores(session, processors, settings, seq, seq_len, step) -> torch.Tensor:
    """Processed log-probs [B·nb,V] of every beam's next token (HF: log_softmax, then processors)."""
    logits = session.forward(seq, seq_len, 1)  # [B·nb,1,V]
    scores = torch.log_softmax(logits.float(), dim=-1)  # like HF: float32 scores (the logits keep the model dtype)
    if settings.sampling.repetition_penalty != 1.0:
        scores = ops.process_logits(scores, prev_tokens=context_tokens(seq, seq_len), do_sample=False,
                                    repetition_penalty=settings.sampling.repetition_penalty)
    return processors(scores, seq, seq_len, torch.full_like(seq_len, step))[:, 0]


def beam_search(model, request: Request, settings: Settings, metrics: GenerationMetrics,
                stopwatch: Stopwatch) -> torch.Tensor:
    """Sequences [B·num_return_sequences, P+N] like HF (the prompt in the caller's layout, then new tokens)."""
    device = request.prompt.device
    batch, num_beams, vocab = request.batch, settings.num_beams, introspect.vocab_size(model)
    max_new = settings.max_new_tokens
    eos = torch.tensor(settings.eos, dtype=torch.long, device=device) if settings.eos else None
    beams_to_keep = max(2, 1 + len(settings.eos)) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
    early_stopping, length_penalty = settings.early_stopping, settings.length_penalty
    # HF fills unused slots with `pad or eos[0]` (a pad id of 0 counts as unset there)
    fill = (settings.pad_token_id or settings.eos[0]) if settings.eos else -1

    session = TargetSession(model, request, stopwatch, inplace_cache=settings.inplace_cache)  # encoder / prefill once
    session.select(torch.arange(batch, device=device).repeat_interleave(num_beams))  # one row per beam
    processors = LogitsProcessors(settings, vocab, device)
    aligned, seq_len = left_align(request.prompt, request.prompt_mask, pad=0)
    seq = torch.cat([aligned, aligned.new_zeros(batch, max_new)], dim=1).repeat_interleave(num_beams, dim=0)
    seq_len = seq_len.repeat_interleave(num_beams)  # [B·nb]

    # HF's state, generated part only: [B,nb,N]
    running_sequences = torch.full((batch, num_beams, max_new), fill, dtype=torch.long, device=device)
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros(batch, num_beams, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, num_beams), -1e9, device=device)
    is_sent_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)  # HF: is_early_stop_heuristic_unsatisfied
    running_beam_indices = torch.full((batch, num_beams, max_new), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.clone()
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams

    step = 0
    while True:
        scores = _beam_scores(session, processors, settings, seq, seq_len, step)
        metrics.record_step([], 0)
        log_probs = (scores.reshape(batch, num_beams, vocab) + running_beam_scores[:, :, None]).flatten(1)

        # top-K continuations over all beams
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_beam = topk_indices // vocab
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_beam)
        topk_running_sequences = _gather_beams(running_sequences, topk_beam)
        topk_ids = topk_indices % vocab
        topk_running_sequences[:, :, step] = topk_ids
        topk_running_beam_indices[:, :, step] = (topk_beam + batch_offset).to(torch.int32)
        hits = torch.full_like(topk_ids, step + 1 >= max_new, dtype=torch.bool)
        if eos is not None:
            hits |= torch.isin(topk_ids, eos)

        # running beams for the next step: the best non-finished ones
        topk_running_log_probs = topk_log_probs + hits.float() * -1.0e9
        next_topk = torch.topk(topk_running_log_probs, k=num_beams)[1]
        running_sequences = _gather_beams(topk_running_sequences, next_topk)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_topk)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk)

        # finished hypotheses: merge, keep the best num_beams
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / ((step + 1) ** length_penalty)
        beams_full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        finished_scores = finished_scores + beams_full.float() * -1.0e9
        finished_scores = finished_scores + (~improvable).float() * -1.0e9
        finished_scores = finished_scores + (~just_finished) * -1.0e9
        keep = torch.topk(torch.cat((beam_scores, finished_scores), dim=1), k=num_beams)[1]
        sequences = _gather_beams(torch.cat((sequences, topk_running_sequences), dim=1), keep)
        beam_scores = _gather_beams(torch.cat((beam_scores, finished_scores), dim=1), keep)
        beam_indices = _gather_beams(torch.cat((beam_indices, topk_running_beam_indices), dim=1), keep)
        is_sent_finished = _gather_beams(torch.cat((is_sent_finished, just_finished), dim=1), keep)

        # the session follows the surviving beams: keep the block's KV, reorder, append the new token
        session.advance(seq_len + 1)
        parents = running_beam_indices[..., step].reshape(-1).long()  # [B·nb]
        session.select(parents)
        seq = seq[parents]
        seq[torch.arange(seq.shape[0], device=device), seq_len] = running_sequences[..., step].reshape(-1)
        seq_len = seq_len + 1
        step += 1

        # HF's early-stop heuristic and loop condition
        best_length = max_new if (early_stopping == "never" and length_penalty > 0.0) else step
        best_running = running_beam_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_sent_finished, beam_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beam = not (bool(is_sent_finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break

    nrs = settings.num_return_sequences
    sequences = sequences[:, :nrs].reshape(batch * nrs, max_new)
    generated_length = int((beam_indices[:, :nrs].reshape(batch * nrs, -1) + 1).bool().sum(dim=1).max())
    session.add_counts(metrics)
    metrics.num_generated_tokens += generated_length * batch * nrs
    prompt = request.prompt.repeat_interleave(nrs, dim=0)
    return torch.cat([prompt, sequences[:, :generated_length]], dim=1)
