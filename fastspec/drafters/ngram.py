"""NgramDrafter: the native :class:`fastspec.NgramTable` behind the drafter protocol.

Fitted on reference summaries or on the target's own outputs (the pseudo-dataset: the seed's
key idea, the drafter learns what THIS target writes; see ``fastspec.distill.trainer.fit_ngram_drafter``). The context is the target's own input
sequence (``[decoder_start] + generated`` for seq2seq, ``prompt + generated`` for causal); only
its last n-1 tokens matter. Greedy drafting is one native call for all rows and γ steps;
sampled drafting draws each token from q = the table's probabilities processed like the
target's (``ops.process_logits`` on their logs), one native ``next_probs`` call per step.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from fastspec import ops
from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.context import decoder_sequences, request_source, right_to_left_pad
from fastspec.drafters.folder import file_sha256, load_folder, save_folder
from fastspec.errors import UserError
from fastspec.ngram import NgramTable

TABLE_FILE = "ngram.bin"


class NgramDrafter(Drafter):
    """Drafts from an n-gram table with Laplace smoothing and backoff.

    Args:
        table: a fitted :class:`fastspec.NgramTable` (or its ReferenceNgramTable twin).
        start_token_id: prepended to every training sequence by :meth:`fit` (use the target's
            decoder start token for seq2seq targets so the first output token has a context).
    """

    deterministic = False  # greedy: argmax drafts (probs None); sampling: q returned

    def __init__(self, table=None, *, n: Optional[int] = None, vocab_size: Optional[int] = None,
                 smoothing: float = 1.0, start_token_id: Optional[int] = None):
        if table is None:
            if n is None or vocab_size is None:
                raise ValueError("NgramDrafter needs a table, or n= and vocab_size= to make one")
            table = NgramTable(n, vocab_size, smoothing)
        self.table = table
        self.vocab_size = int(table.vocab_size)
        self.start_token_id = start_token_id

    @classmethod
    def create(cls, n: int, vocab_size: int, smoothing: float = 1.0, start_token_id: Optional[int] = None):
        return cls(n=n, vocab_size=vocab_size, smoothing=smoothing, start_token_id=start_token_id)

    # ------------------------------------------------------------------ fitting
    def _with_start(self, sequences: Sequence[Sequence[int]]):
        seqs = [list(map(int, s)) for s in sequences]
        if self.start_token_id is None:
            return seqs
        return [[int(self.start_token_id)] + s for s in seqs]

    def fit(self, sequences: Sequence[Sequence[int]]) -> "NgramDrafter":
        """Reset and count ``sequences`` (reference summaries or target outputs)."""
        self.table.fit(self._with_start(sequences))
        return self

    def update(self, sequences: Sequence[Sequence[int]]) -> "NgramDrafter":
        self.table.update(self._with_start(sequences))
        return self

    # ------------------------------------------------------------------ protocol
    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        if request.vocab_size != self.vocab_size:
            raise ValueError(f"n-gram table vocabulary {self.vocab_size} != target vocabulary {request.vocab_size}")
        self._source = None if request.is_encoder_decoder else request_source(request)
        self._generator = request.generator

    def contexts(self, step: DraftStep) -> torch.Tensor:
        """The last n-1 tokens of each row's sequence, left-padded with -1: [B, max(n-1,1)]."""
        seq, lens = decoder_sequences(self.request, step, self._source)
        return right_to_left_pad(seq, lens, max(int(self.table.n) - 1, 1))

    def draft(self, step: DraftStep) -> DraftOutput:
        gamma = int(step.gamma)
        context = self.contexts(step).cpu()  # [B,n-1]
        device = step.generated.device
        if not self.request.sampling.do_sample:
            return DraftOutput(tokens=self.table.draft(context, gamma).to(device))
        s = self.request.sampling
        prev, tokens, probs = context, [], []
        for _ in range(gamma):
            p = self.table.next_probs(prev)  # [B,V]
            q = ops.process_logits(
                p.clamp_min(1e-30).log()[:, None], prev_tokens=prev, do_sample=True, temperature=s.temperature,
                top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
            )[:, 0]
            token = torch.multinomial(q, 1, generator=self._cpu_generator())[:, 0]
            tokens.append(token)
            probs.append(q)
            prev = torch.cat([prev, token[:, None]], dim=1)
        return DraftOutput(tokens=torch.stack(tokens, 1).to(device), probs=torch.stack(probs, 1).to(device))

    def _cpu_generator(self):
        gen = self._generator
        return gen if gen is not None and gen.device.type == "cpu" else None

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, TABLE_FILE)
        self.table.save(path)
        config = {"n": int(self.table.n), "vocab_size": self.vocab_size, "smoothing": float(self.table.smoothing),
                  "start_token_id": self.start_token_id, "table": TABLE_FILE}
        save_folder(folder, "ngram", config, extra_files={TABLE_FILE: file_sha256(path)})

    @classmethod
    def load(cls, folder: str) -> "NgramDrafter":
        config, _ = load_folder(folder, "ngram")
        table = NgramTable.load(os.path.join(folder, str(config.get("table", TABLE_FILE))))
        if int(table.vocab_size) != int(config.get("vocab_size", -1)) or int(table.n) != int(config.get("n", -1)):
            raise UserError(f"{folder!r}: the n-gram table does not match config.json (n / vocab_size)")
        return cls(table, start_token_id=config.get("start_token_id"))


__all__ = ["NgramDrafter"]
