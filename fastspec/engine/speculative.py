"""The speculative loop: one verification forward of the target per step, lossless.

Per step, for the rows still running (gpt-fast's ``speculative_decode``, batched and ragged):
draft γ tokens (at most what a running row may still emit − 1) → one target forward over
[pending, last, drafts] → per-position logits processors → fused verify (accepted drafts + one recovered/bonus token) → emit (cut at EOS and
max_new_tokens) → crop the cache and drop finished rows → adapt γ.
``drafter=None`` is plain autoregressive decoding through the same loop (γ = 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from fastspec import introspect, ops
from fastspec.drafters.base import CommitInfo, DraftRequest, DraftStep
from fastspec.drafters.context import left_align
from fastspec.engine.config import Settings
from fastspec.engine.processors import LogitsProcessors, context_tokens
from fastspec.engine.session import Stopwatch, TargetSession
from fastspec.metrics import GenerationMetrics


@dataclass
class Rows:
    """Full-batch bookkeeping. Tokens past ``seq_len`` are scratch (drafts).

    seq: [B,C] each row's real tokens, left-aligned: causal prompt (or seq2seq decoder prompt)
        then the committed tokens. seq_len: [B]. generated: [B,G] emitted tokens, -1 padded.
    num_generated: [B].
    """

    seq: torch.Tensor
    seq_len: torch.Tensor
    generated: torch.Tensor
    num_generated: torch.Tensor

    @classmethod
    def start(cls, prompt: torch.Tensor, prompt_mask: torch.Tensor, room: int) -> "Rows":
        """prompt, prompt_mask: [B,P] any padding side; room: the tokens that may follow."""
        aligned, seq_len = left_align(prompt, prompt_mask, pad=0)  # scratch: any valid id
        batch = prompt.shape[0]
        seq = torch.zeros((batch, prompt.shape[1] + room), dtype=torch.long, device=prompt.device)
        seq[:, : prompt.shape[1]] = aligned
        generated = torch.full((batch, room), -1, dtype=torch.long, device=prompt.device)
        return cls(seq, seq_len, generated, torch.zeros_like(seq_len))


class DraftClock:
    """The drafter's calls and their time (the same optional-sync stopwatch as the target)."""

    def __init__(self, drafter, stopwatch: Stopwatch, metrics: GenerationMetrics):
        self.drafter, self.stopwatch, self.metrics = drafter, stopwatch, metrics

    def __call__(self, method: str, *args, count: bool = False):
        start = self.stopwatch.now()
        out = getattr(self.drafter, method)(*args)
        self.metrics.draft_time_s += self.stopwatch.now() - start
        self.metrics.draft_calls += int(count)
        return out


def draft_step(clock: DraftClock, rows: Rows, active_rows: torch.Tensor, gamma: int, vocab: int,
               do_sample: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draft tokens [b,k] (k ≤ γ) and probs [b,k,V] or None for the running rows ``active_rows`` [b]."""
    device = rows.seq.device
    active = torch.zeros(rows.seq.shape[0], dtype=torch.bool, device=device)
    active[active_rows] = True
    width = int(rows.num_generated.max())
    step = DraftStep(generated=rows.generated[:, :width], num_generated=rows.num_generated, active=active, gamma=gamma)
    draft = clock("draft", step, count=True)
    tokens = draft.tokens.to(device=device, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[0] != rows.seq.shape[0] or not 0 <= tokens.shape[1] <= gamma:
        raise ValueError(f"drafter returned tokens of shape {tuple(draft.tokens.shape)}, want [B,k] with k <= γ={gamma}")
    tokens = tokens[active_rows]
    if bool((tokens < 0).any()) or bool((tokens >= vocab).any()):
        raise ValueError("drafter returned token ids outside the target vocabulary")
    probs = draft.probs.to(device)[active_rows].float() if draft.probs is not None and do_sample else None
    return tokens, probs


def place_drafts(rows: Rows, active_rows: torch.Tensor, drafts: torch.Tensor) -> None:
    """Write drafts [b,k] after each running row's committed tokens (scratch slots)."""
    index = rows.seq_len[active_rows, None] + torch.arange(drafts.shape[1], device=drafts.device)
    rows.seq[active_rows[:, None], index] = drafts


def emit(rows: Rows, active_rows: torch.Tensor, output_tokens: torch.Tensor, num_accepted: torch.Tensor,
         settings: Settings, eos: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Commit accepted + recovered/bonus tokens, cut at max_new_tokens and at the first EOS.

    output_tokens: [b,γ+1] -1 padded; num_accepted: [b]. Returns (committed [b,γ+1] -1 padded, done [b]).
    """
    width = output_tokens.shape[1]
    done_before = rows.num_generated[active_rows]  # [b]
    emitted = torch.minimum(num_accepted + 1, settings.max_new_tokens - done_before)
    position = torch.arange(width, device=output_tokens.device)
    done = (done_before + emitted) >= settings.max_new_tokens
    if eos is not None:
        is_eos = torch.isin(output_tokens, eos) & (position < emitted[:, None])
        has_eos = is_eos.any(-1)
        emitted = torch.where(has_eos, is_eos.int().argmax(-1) + 1, emitted)
        done |= has_eos
    valid = position < emitted[:, None]
    committed = torch.where(valid, output_tokens, -1)
    rows.generated[active_rows[:, None], done_before[:, None] + position] = committed
    row_len = rows.seq_len[active_rows]
    columns = (row_len[:, None] + position).clamp(max=rows.seq.shape[1] - 1)
    rows.seq[active_rows[:, None], columns] = torch.where(valid, output_tokens, 0)
    rows.seq_len[active_rows] = row_len + emitted
    rows.num_generated[active_rows] = done_before + emitted
    return committed, done


def commit_drafter(clock: DraftClock, rows: Rows, active_rows: torch.Tensor, committed: torch.Tensor,
                   accepted: torch.Tensor, session) -> None:
    """Tell the drafter what was kept (full-batch tensors, inactive rows -1 / 0); ``accepted`` [b]
    counts the emitted drafts only. A drafter with ``hidden_state_layers`` also gets each row's
    features of positions [handed, seq_len − 1) (see ``CommitInfo``)."""
    batch, device = rows.seq.shape[0], rows.seq.device
    full_out = torch.full((batch, committed.shape[1]), -1, dtype=torch.long, device=device)
    full_out[active_rows] = committed
    full_acc = torch.zeros(batch, dtype=torch.long, device=device)
    full_acc[active_rows] = accepted
    active = torch.zeros(batch, dtype=torch.bool, device=device)
    active[active_rows] = True
    info = CommitInfo(output_tokens=full_out, num_accepted=full_acc, active=active)
    if getattr(clock.drafter, "hidden_state_layers", None):
        hidden, num = session.take_features(rows.seq_len[active_rows])
        info.hidden_states = hidden.new_zeros((batch,) + tuple(hidden.shape[1:]))
        info.hidden_states[active_rows.to(hidden.device)] = hidden
        info.num_hidden = torch.zeros(batch, dtype=torch.long, device=device)
        info.num_hidden[active_rows] = num.to(device)
    clock("commit", info)


def crop(session: TargetSession, rows: Rows, done: torch.Tensor) -> None:
    """Drop finished rows, then crop the cache to the minimum valid KV over the rows left."""
    if bool(done.any()):
        session.select((~done).nonzero().flatten())
    if session.rows.numel() > 0:
        session.advance(rows.seq_len[session.rows])


def adapt_gamma(gamma: int, drafted: int, num_accepted: torch.Tensor, settings: Settings) -> int:
    """Dynamic γ: +1 after full acceptance by every row, −1 after an early rejection by every row.
    ``num_accepted`` [b] counts emitted drafts only (as α does), so offline replay adapts alike."""
    if not settings.dynamic_gamma or drafted == 0 or drafted != gamma:
        return gamma
    if bool((num_accepted == gamma).all()):
        return min(gamma + 1, settings.max_gamma)
    if bool((num_accepted < gamma).all()):
        return max(gamma - 1, settings.min_gamma)
    return gamma


def draft_length(gamma: int, rows: Rows, active: torch.Tensor, settings: Settings) -> int:
    """Tokens to draft this step: γ, but never past what a running row may still emit (the last
    emitted token is the target's), and within ``max_verify_rows`` rows of verify block (0 = plain
    target step). active: [b] running rows."""
    length = min(gamma, int((settings.max_new_tokens - rows.num_generated[active]).max()) - 1)
    if settings.max_verify_rows:
        length = min(length, settings.max_verify_rows // active.numel() - 1)
    return length


def draft_request(request, model, settings: Settings, generator, start_id: int, session) -> DraftRequest:
    """What the drafter learns once; ``start_id`` is the seq2seq rows' first decoder token."""
    seq2seq = introspect.is_encoder_decoder(model)
    return DraftRequest(
        source_ids=request.source_ids,
        source_mask=request.source_mask,
        is_encoder_decoder=seq2seq,
        vocab_size=introspect.vocab_size(model),
        decoder_start_token_id=start_id if seq2seq else None,
        pad_token_id=settings.pad_token_id,
        eos_token_id=list(settings.eos) or None,
        sampling=settings.sampling,
        generator=generator,
        batch_size=request.batch,
        device=request.prompt.device,
        decoder_prompt_ids=request.prompt if seq2seq else None,
        decoder_prompt_mask=request.prompt_mask if seq2seq else None,
        encoder_hidden_states=session.encoder_hidden_states,
    )


def speculative_decode(model, drafter, request, settings: Settings, metrics: GenerationMetrics,
                       stopwatch: Stopwatch, generator, session=None) -> torch.Tensor:
    """Decode every row of ``request``; returns the new tokens [B,N] -1 padded (metrics filled in).

    ``session``: the target side (default: a :class:`TargetSession` of ``model``); offline replay
    passes a session with the same interface that reads a known output instead.
    """
    vocab = introspect.vocab_size(model)
    rows = Rows.start(request.prompt, request.prompt_mask, settings.max_new_tokens + settings.max_gamma + 1)
    eos = torch.tensor(settings.eos, dtype=torch.long, device=rows.seq.device) if settings.eos else None
    processors = LogitsProcessors(settings, vocab, rows.seq.device)
    clock = DraftClock(drafter, stopwatch, metrics)
    if session is None:
        session = TargetSession(model, request, stopwatch, getattr(drafter, "hidden_state_layers", None),
                                settings.inplace_cache)
    if drafter is not None:
        clock("begin", draft_request(request, model, settings, generator, int(rows.seq[0, 0]), session))
    gamma = settings.gamma
    try:
        while session.rows.numel() > 0:
            active = session.rows  # [b] original indices of running rows
            step_gamma = draft_length(gamma, rows, active, settings)
            if drafter is not None and step_gamma > 0:
                drafts, draft_probs = draft_step(clock, rows, active, step_gamma, vocab, settings.sampling.do_sample)
            else:
                drafts, draft_probs = rows.seq.new_empty(active.numel(), 0), None
            place_drafts(rows, active, drafts)
            # block: one target forward over [pending, last, drafts]; logits at [last, drafts]
            row_seq, row_len = rows.seq[active], rows.seq_len[active]
            logits = session.forward(row_seq, row_len, drafts.shape[1] + 1)  # [b,k+1,V] model dtype
            logits = processors(logits, row_seq, row_len, rows.num_generated[active])
            # verify: accepted drafts + one recovered/bonus token per row
            sampling = settings.sampling
            prev_tokens = context_tokens(row_seq, row_len) if sampling.repetition_penalty != 1.0 else None
            output_tokens, num_accepted = ops.fused_verify(
                logits, drafts, draft_probs, prev_tokens=prev_tokens, do_sample=sampling.do_sample,
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty, generator=generator,
            )
            num_accepted, output_tokens = num_accepted.to(rows.seq.device), output_tokens.to(rows.seq.device)
            committed, done = emit(rows, active, output_tokens, num_accepted, settings, eos)
            # α counts the drafts that were emitted (an accepted draft cut by EOS/max_new_tokens is not)
            accepted = torch.minimum(num_accepted, (committed >= 0).sum(-1) - 1)
            metrics.record_step(accepted.tolist(), drafts.shape[1])
            if drafter is not None:
                commit_drafter(clock, rows, active, committed, accepted, session)
            crop(session, rows, done)
            gamma = adapt_gamma(gamma, drafts.shape[1], accepted, settings)
    finally:
        if drafter is not None:
            clock("end")
    session.add_counts(metrics)
    metrics.num_generated_tokens += int(rows.num_generated.sum())
    return rows.generated[:, : int(rows.num_generated.max())]
