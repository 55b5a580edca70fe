"""HF's mask-type logits processors, applied at EVERY verified position.

Position k of row b is scored after the row's context ``tokens[b, :lengths[b] + k]`` (its real
prompt and committed tokens, then drafts[:k]), exactly as HF's processor would score that
prefix decoded alone. So a draft that a processor forbids is rejected, and speculation stays
lossless. Repetition penalty, temperature, top-k and top-p are applied later by the fused
verify op; every mask here commutes with them (a -inf stays -inf, a forced 0 stays 0).

Order (HF ``_get_logits_processor``): no_repeat_ngram, bad_words, min_length, min_new_tokens,
forced_bos, forced_eos, suppress_tokens, begin_suppress_tokens.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastspec.engine.config import Settings

_NEG_INF = float("-inf")


def context_tokens(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """tokens [b,T] left-aligned, lengths [b] -> [b,max(lengths)] with -1 after each row's length."""
    span = int(lengths.max())
    columns = torch.arange(span, device=tokens.device)
    return torch.where(columns < lengths[:, None], tokens[:, :span], -1)


def _suffix(tokens: torch.Tensor, ends: torch.Tensor, size: int) -> torch.Tensor:
    """tokens [b,T], ends [b,K] -> [b,K,size]: the ``size`` tokens before each end (clamped at 0)."""
    index = (ends[:, :, None] - size + torch.arange(size, device=tokens.device)).clamp(min=0)
    return tokens.gather(1, index.flatten(1)).view(*ends.shape, size)


def _ban(banned: torch.Tensor, ids: torch.Tensor, match: torch.Tensor) -> None:
    """banned [b,K,V] |= one-hot(ids [b,K,X]) where match [b,K,X]; misses go to a spare column."""
    vocab = banned.shape[-1]
    spare = torch.zeros(*banned.shape[:-1], vocab + 1, dtype=torch.bool, device=banned.device)
    spare.scatter_(2, torch.where(match, ids.clamp(0, vocab), vocab), True)
    banned |= spare[..., :vocab]


class LogitsProcessors:
    """The settings' processors for one request, on ``device``."""

    def __init__(self, settings: Settings, vocab: int, device: torch.device):
        self.settings = settings
        self.vocab = vocab

        def mask(ids) -> Optional[torch.Tensor]:  # [V] bool, or None when empty
            if not ids:
                return None
            return torch.zeros(vocab, dtype=torch.bool, device=device).index_fill_(
                0, torch.tensor(list(ids), dtype=torch.long, device=device), True
            )

        self.eos = mask(settings.eos)
        self.suppress = mask(settings.suppress_tokens)
        self.begin_suppress = mask(settings.begin_suppress_tokens)
        self.forced_bos = mask([] if settings.forced_bos_token_id is None else [settings.forced_bos_token_id])
        self.forced_eos = mask(settings.forced_eos_token_ids)
        single = [w[0] for w in settings.bad_words_ids if len(w) == 1]
        self.bad_single = mask(single)
        # multi-token bad words grouped by prefix length: (prefixes [G,m], last tokens [G])
        groups: dict = {}
        for word in settings.bad_words_ids:
            if len(word) > 1:
                groups.setdefault(len(word) - 1, []).append(word)
        self.bad_groups: List[Tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.tensor([w[:-1] for w in words], dtype=torch.long, device=device),
                torch.tensor([w[-1] for w in words], dtype=torch.long, device=device),
            )
            for words in groups.values()
        ]
        s = settings
        self.active = bool(
            s.no_repeat_ngram_size or s.bad_words_ids or s.forced_bos_token_id is not None or s.forced_eos_token_ids
            or s.suppress_tokens or s.begin_suppress_tokens
            or (self.eos is not None and (s.min_length > 0 or s.min_new_tokens > 0))
        )

    def __call__(
        self,
        logits: torch.Tensor,  # [b,K,V] scores of K consecutive positions per row
        tokens: torch.Tensor,  # [b,T] left-aligned real tokens (+ drafts), T >= lengths + K - 1
        lengths: torch.Tensor,  # [b] context length at position 0
        num_generated: torch.Tensor,  # [b] tokens generated before position 0
    ) -> torch.Tensor:
        if not self.active:
            return logits
        s = self.settings
        positions = torch.arange(logits.shape[1], device=logits.device)
        context = lengths[:, None] + positions  # [b,K] HF's cur_len at each position
        new = num_generated[:, None] + positions  # [b,K] tokens generated before each position
        prompt_len = lengths - num_generated  # [b]

        banned = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        if s.no_repeat_ngram_size > 0:
            self._no_repeat_ngram(banned, tokens, context, s.no_repeat_ngram_size)
        if s.bad_words_ids:
            self._bad_words(banned, tokens, context)
        if self.eos is not None:
            short = (context < s.min_length) | (new < s.min_new_tokens)  # [b,K]
            banned |= short[:, :, None] & self.eos
        logits = logits.masked_fill(banned, _NEG_INF)
        if self.forced_bos is not None:
            logits = self._force(logits, context == 1, self.forced_bos)
        if self.forced_eos is not None:
            logits = self._force(logits, new == s.max_new_tokens - 1, self.forced_eos)
        if self.suppress is not None:
            logits = logits.masked_fill(self.suppress, _NEG_INF)
        if self.begin_suppress is not None:
            # HF's begin index moves one on when a forced BOS takes the first slot
            begin = (prompt_len == 1).long() * int(s.forced_bos_token_id is not None)  # [b]
            at_begin = new == begin[:, None]  # [b,K]
            logits = logits.masked_fill(at_begin[:, :, None] & self.begin_suppress, _NEG_INF)
        return logits

    @staticmethod
    def _force(logits: torch.Tensor, where: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """HF's forced-token processors: 0 for the allowed ids, -inf elsewhere, at positions ``where`` [b,K]."""
        forced = torch.where(allowed, 0.0, _NEG_INF).to(logits.dtype)  # [V]
        return torch.where(where[:, :, None], forced, logits)

    @staticmethod
    def _no_repeat_ngram(banned: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor, n: int) -> None:
        """Ban every token that would complete an n-gram already in the context (HF NoRepeatNGram)."""
        if tokens.shape[1] < n:
            return
        windows = tokens.unfold(1, n, 1)  # [b,Wn,n]: every n-gram start
        starts = torch.arange(windows.shape[1], device=tokens.device)
        inside = starts <= context[:, :, None] - n  # [b,K,Wn] the n-gram lies inside the context
        if n > 1:
            query = _suffix(tokens, context, n - 1)  # [b,K,n-1] the last n-1 tokens
            inside &= (windows[:, None, :, :-1] == query[:, :, None, :]).all(-1)
        last = windows[:, None, :, -1].expand_as(inside)  # [b,K,Wn]
        _ban(banned, last, inside)

    def _bad_words(self, banned: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor) -> None:
        """Ban each bad word's last token where the context ends with the rest of it (HF NoBadWords)."""
        if self.bad_single is not None:
            banned |= self.bad_single
        for prefixes, last in self.bad_groups:
            size = prefixes.shape[1]
            ends = _suffix(tokens, context, size)  # [b,K,m]
            match = (ends[:, :, None, :] == prefixes).all(-1) & (context >= size)[:, :, None]  # [b,K,G]
            _ban(banned, last.expand_as(match), match)
