"""PromptLookupDrafter: copy continuations of the output's last n tokens from the source.

Unlike HF's ``prompt_lookup_num_tokens`` (which searches only the decoder/causal input), for a
seq2seq target the **source document is the encoder input**, and that is where a summary copies
from. The matcher is native (``torch.ops.fastspec.prompt_lookup_draft``, one call for the whole
batch and all γ tokens); :func:`prompt_lookup_reference` is its pure-Python twin.

Rule (see csrc/include/fastspec/prompt_lookup.h), repeated until γ tokens are drafted:
``text = (prompt if causal) + generated + drafts``; for n = max_n..min_n take the last n tokens
of ``text`` and copy what follows their earliest occurrence in the source (seq2seq), else in
``text`` itself. Positions left without a match go to the ``fallback`` drafter (any drafter).

The hybrid (``fallback=``) decides per row and per step. A row whose last n ≥ ``min_n`` tokens
match takes the lookup draft; the other rows take the fallback's draft. With ``confirm_n`` (a
commit-driven fallback only), a short match (min_n ≤ n < confirm_n) is taken only where the
fallback's own first draft token agrees with the lookup's first token; else the fallback's draft.
Two kinds of fallback:

* context drafters (n-gram, CNN, LSTM, HF: they draft from ``DraftStep.generated``) continue a
  partial match: they draft after ``generated + matched tokens``, so one call fills every row;
* commit-driven drafters (``drafts_from_commits = True``, e.g. the FeatureDrafter: they draft from
  their own KV cache and the target's features, fed by ``commit``) draft once from the real prefix;
  lookup rows keep only their lookup tokens.

Every row's draft is padded to the step's width k (the longest draft among active rows) with the
row's last token (q one-hot there): any token is lossless, and these cost no extra verify position.
The fallback sees every ``begin``/``commit``/``end`` and its ``hidden_state_layers``, so the engine
feeds it the target's features. q (sampling) is one-hot on lookup tokens and pads and the
fallback's q on its own tokens: each row's draft token is drawn from the q returned for it.
``last_lookup_rows`` [B] bool records which rows took the lookup arm in the last step.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from fastspec import ops
from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.context import request_source
from fastspec.drafters.io import load_folder, save_folder


def prompt_lookup_reference(
    sources: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    gamma: int,
    max_n: int,
    min_n: int,
    source_is_prefix: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-Python twin of the native matcher. Returns (tokens [B,γ] -1 padded, num_drafted [B])."""
    out = torch.full((len(sources), gamma), -1, dtype=torch.long)
    num = torch.zeros(len(sources), dtype=torch.long)

    def earliest(hay: List[int], query: List[int]) -> int:
        n = len(query)
        for s in range(len(hay) - n):  # s + n < len(hay): at least one token follows
            if hay[s : s + n] == query:
                return s
        return -1

    for b, (src, gen) in enumerate(zip(sources, generated)):
        src, text = list(src), (list(src) if source_is_prefix else []) + list(gen)
        drafted: List[int] = []
        while len(drafted) < gamma:
            piece: List[int] = []
            for n in range(min(max_n, len(text)), max(min_n, 1) - 1, -1):
                query = text[len(text) - n :]
                if not source_is_prefix:
                    s = earliest(src, query)
                    if s >= 0:
                        piece = src[s + n : s + n + gamma - len(drafted)]
                        break
                s = earliest(text, query)
                if s >= 0:
                    piece = text[s + n : s + n + gamma - len(drafted)]
                    break
            if not piece:
                break
            drafted += piece
            text += piece
        out[b, : len(drafted)] = torch.tensor(drafted, dtype=torch.long)
        num[b] = len(drafted)
    return out, num


def _rows(tokens: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
    return [row[:n].tolist() for row, n in zip(tokens, lengths.tolist())]


class PromptLookupDrafter(Drafter):
    """Deterministic source-copy drafter (q one-hot), optionally backed by a fallback drafter.

    Args:
        max_n / min_n: query lengths, longest tried first.
        fallback: drafter for the positions no match fills (source match first, corpus model next).
        confirm_n: 0 (off), or matches shorter than this are taken only where a commit-driven
            fallback's first draft token agrees (min_n < confirm_n <= max_n).
        use_native: use the C++ matcher when the extension is built (else the Python twin).
    """

    def __init__(self, max_n: int = 4, min_n: int = 1, fallback: Optional[Drafter] = None, use_native: bool = True,
                 confirm_n: int = 0):
        if not (1 <= int(min_n) <= int(max_n)):
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if int(confirm_n) and not (int(min_n) < int(confirm_n) <= int(max_n)):
            raise ValueError(f"need min_n < confirm_n <= max_n (or confirm_n=0), got confirm_n={confirm_n}, "
                             f"min_n={min_n}, max_n={max_n}")
        if int(confirm_n) and not getattr(fallback, "drafts_from_commits", False):
            raise ValueError("confirm_n needs a commit-driven fallback (drafts_from_commits, e.g. the FeatureDrafter)")
        self.max_n, self.min_n, self.confirm_n = int(max_n), int(min_n), int(confirm_n)
        self.fallback = fallback
        self.use_native = bool(use_native)
        self.vocab_size = fallback.vocab_size if fallback is not None else None
        self.last_lookup_rows: Optional[torch.Tensor] = None

    @property
    def deterministic(self) -> bool:  # q is one-hot unless the fallback samples
        return self.fallback is None or self.fallback.deterministic

    @property
    def hidden_state_layers(self) -> Optional[tuple]:
        """The fallback's request for target features (None = none), so the engine feeds it."""
        return getattr(self.fallback, "hidden_state_layers", None)

    @property
    def drafts_from_commits(self) -> bool:
        return bool(getattr(self.fallback, "drafts_from_commits", False))

    @property
    def native(self) -> bool:
        return self.use_native and ops.native_available() and hasattr(torch.ops.fastspec, "prompt_lookup_draft")

    def begin(self, request: DraftRequest) -> None:
        if request.source_ids is None:
            raise ValueError(
                "PromptLookupDrafter copies from the source, but this target has no token source (input_ids): "
                "use a drafter that reads only the generated tokens"
            )
        super().begin(request)
        self._source, self._source_len = (t.cpu() for t in request_source(request))  # [B,S], [B]
        self._prefix = not request.is_encoder_decoder
        self._vocab = request.vocab_size
        if self.fallback is not None:
            self.fallback.begin(request)

    def lookup(self, generated: torch.Tensor, num_generated: torch.Tensor, gamma: int, min_n: Optional[int] = None):
        """Match only: (tokens [B,γ] -1 where unmatched, num_drafted [B]) for right-padded generated."""
        gen = generated.detach().long().cpu().contiguous()
        num = num_generated.detach().long().cpu().contiguous()
        min_n = self.min_n if min_n is None else int(min_n)
        if self.native:
            return torch.ops.fastspec.prompt_lookup_draft(
                self._source, self._source_len, gen, num, int(gamma), self.max_n, min_n, self._prefix
            )
        return prompt_lookup_reference(
            _rows(self._source, self._source_len), _rows(gen, num), gamma, self.max_n, min_n, self._prefix
        )

    def draft(self, step: DraftStep) -> DraftOutput:
        device = step.generated.device
        gamma = int(step.gamma)
        tokens, num = self.lookup(step.generated, step.num_generated, gamma)  # [B,γ], [B]
        weak = torch.zeros_like(num, dtype=torch.bool)  # [B] matches that need the fallback's agreement
        if self.confirm_n and self.fallback is not None:
            weak = (num > 0) & (self.lookup(step.generated, step.num_generated, 1, self.confirm_n)[1] == 0)
        self.last_lookup_rows = num > 0
        probs = None
        active = step.active.cpu().bool()
        missing = num < gamma
        if self.fallback is not None and self.drafts_from_commits and bool((active & ((num == 0) | weak)).any()):
            tokens, probs = self._choose_per_row(step, tokens, num, weak)
        elif bool(missing.any()):
            if self.fallback is not None and not self.drafts_from_commits:
                tokens, probs = self._fill_with_fallback(step, tokens, num)
            else:
                # Draft only as far as the longest match among active rows (fewer verified positions);
                # shorter rows repeat their last known token there (a cheap guess the target corrects).
                width = int(num[active].max()) if bool(active.any()) else 0
                tokens = self._pad(step, tokens, width)
        tokens = tokens.to(device)
        if not self.deterministic and probs is None and self.request.sampling.do_sample:
            probs = torch.nn.functional.one_hot(tokens, self._vocab).float()  # greedy needs no q
        return DraftOutput(tokens=tokens, probs=None if probs is None else probs.to(device))

    def _pad(self, step: DraftStep, tokens: torch.Tensor, width: int) -> torch.Tensor:
        """tokens [B,≥width] with −1 where a row has none -> [B,width], −1 replaced by the row's last token."""
        last = self._last_tokens(step)
        if tokens.shape[1] < width:
            tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], width - tokens.shape[1]), -1)], dim=1)
        return torch.where(tokens < 0, last[:, None], tokens)[:, :width]

    def _choose_per_row(self, step: DraftStep, tokens: torch.Tensor, num: torch.Tensor, weak: torch.Tensor):
        """Commit-driven fallback: it drafts once from the real prefix; rows without a lookup match
        (or with a ``weak`` one whose first token it does not draft) take its draft, the others their
        lookup tokens; all padded to the longest active draft."""
        fb = self.fallback.draft(step)
        fb_tokens = fb.tokens.long().cpu()  # [B,k_fb]
        use_fb = num == 0  # [B]
        if fb_tokens.shape[1] > 0:
            use_fb |= weak & (fb_tokens[:, 0] != tokens[:, 0])
        self.last_lookup_rows = ~use_fb
        active = step.active.cpu().bool()
        lookup_width = int(num[active & ~use_fb].max()) if bool((active & ~use_fb).any()) else 0
        width = max(lookup_width, fb_tokens.shape[1])
        out = torch.where(use_fb[:, None], self._pad(step, fb_tokens, width), self._pad(step, tokens, width))
        probs = None
        if fb.probs is not None and fb_tokens.shape[1] > 0:
            probs = torch.nn.functional.one_hot(out, fb.probs.shape[-1]).float()  # [B,k,V]
            k_fb = fb_tokens.shape[1]
            probs[:, :k_fb] = torch.where(use_fb[:, None, None], fb.probs.float().cpu(), probs[:, :k_fb])
        return out, probs

    def _last_tokens(self, step: DraftStep) -> torch.Tensor:
        gen = step.generated.long().cpu()
        num = step.num_generated.long().cpu()
        last = torch.zeros(num.shape[0], dtype=torch.long)
        if gen.shape[1] > 0:
            last = torch.where(num > 0, gen.gather(1, (num - 1).clamp(min=0)[:, None])[:, 0], 0)
        if self._prefix:  # causal: fall back to the prompt's last token
            src_last = self._source.gather(1, (self._source_len - 1).clamp(min=0)[:, None])[:, 0].clamp(min=0)
            last = torch.where(num > 0, last, src_last)
        return last

    def _fill_with_fallback(self, step: DraftStep, tokens: torch.Tensor, num: torch.Tensor):
        """The fallback drafts after each row's matched prefix; its tokens fill positions num[b]..γ-1."""
        gamma = int(step.gamma)
        gen = step.generated.long().cpu()
        gen_num = step.num_generated.long().cpu()
        batch = gen.shape[0]
        extended = torch.full((batch, gen.shape[1] + gamma), -1, dtype=torch.long)
        extended[:, : gen.shape[1]] = gen
        index = gen_num[:, None] + torch.arange(gamma)  # [B,γ]
        extended.scatter_(1, index, tokens)  # matched drafts (and -1 where unmatched)
        extended = torch.where(torch.arange(extended.shape[1]) < (gen_num + num)[:, None], extended, -1)
        width = int((gen_num + num).max()) if batch else 0
        sub = DraftStep(
            generated=extended[:, :width].to(step.generated.device),
            num_generated=(gen_num + num).to(step.num_generated.device),
            active=step.active,
            gamma=gamma,
        )
        fb = self.fallback.draft(sub)
        shift = (torch.arange(gamma)[None, :] - num[:, None])  # [B,γ] fallback index per position
        from_fallback = shift >= 0
        fb_tokens = fb.tokens.long().cpu().gather(1, shift.clamp(min=0))
        out = torch.where(from_fallback, fb_tokens, tokens)
        probs = None
        if fb.probs is not None:
            fb_probs = fb.probs.float().cpu()  # [B,γ,V]
            probs = torch.nn.functional.one_hot(out, fb_probs.shape[-1]).float()
            gathered = fb_probs.gather(1, shift.clamp(min=0)[:, :, None].expand(-1, -1, fb_probs.shape[-1]))
            probs = torch.where(from_fallback[:, :, None], gathered, probs)
        return out, probs

    def commit(self, info) -> None:
        # Every commit reaches the fallback: commit-driven ones (the FeatureDrafter) advance their
        # cache and features with it; context drafters (the LSTM) check it against what they drafted.
        if self.fallback is not None:
            self.fallback.commit(info)

    def end(self) -> None:
        if self.fallback is not None:
            self.fallback.end()
        super().end()

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        config = {"max_n": self.max_n, "min_n": self.min_n, "confirm_n": self.confirm_n, "fallback": None}
        if self.fallback is not None:
            import os

            self.fallback.save(os.path.join(folder, "fallback"))
            config["fallback"] = "fallback"
        save_folder(folder, "prompt_lookup", config)

    @classmethod
    def load(cls, folder: str, target=None, dtype=None, **kwargs) -> "PromptLookupDrafter":
        """``target``/``dtype``: passed on to the fallback's loader (:func:`~fastspec.drafters.io.load_drafter`;
        feature and layer-skip fallbacks need the target)."""
        import os

        from fastspec.drafters.io import load_drafter

        config, _ = load_folder(folder, "prompt_lookup")
        try:
            max_n, min_n, confirm_n = int(config["max_n"]), int(config["min_n"]), int(config.get("confirm_n", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupted prompt-lookup config in {folder!r}: {e}") from None
        fallback = load_drafter(os.path.join(folder, config["fallback"]), target, dtype) if config.get("fallback") else None
        return cls(max_n=max_n, min_n=min_n, fallback=fallback, confirm_n=confirm_n, **kwargs)


__all__ = ["PromptLookupDrafter", "prompt_lookup_reference"]
