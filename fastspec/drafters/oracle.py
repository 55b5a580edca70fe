"""OracleDrafter: replays a known continuation per row (α = 1 when it is the target's own output)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep


class OracleDrafter(Drafter):
    """Drafts the next γ tokens of ``continuations[b]`` (generated tokens only: no prompt and no
    decoder start token). Past the end of a continuation it drafts ``fill_token_id``.

    Noisy variants for tests (the draft is still deterministic, q one-hot):
      corrupt_every=k: the token at generated index i is wrong when (i + 1) % k == 0;
      max_correct=m: only the first m tokens of every draft are right;
      noise=p: each (row, generated index) is wrong with probability p, fixed per request
        (seeded by noise_seed), so rows accept ragged counts.
    A wrong token is (right + 1) % V.
    """

    deterministic = True

    def __init__(
        self,
        continuations: Sequence[Sequence[int]] | torch.Tensor,
        *,
        corrupt_every: int = 0,
        max_correct: Optional[int] = None,
        fill_token_id: int = 0,
        noise: float = 0.0,
        noise_seed: int = 0,
        vocab_size: Optional[int] = None,
    ):
        if isinstance(continuations, torch.Tensor):
            continuations = [[t for t in row.tolist() if t >= 0] for row in continuations]
        self.continuations = [list(map(int, row)) for row in continuations]
        self.corrupt_every = int(corrupt_every)
        self.max_correct = max_correct
        self.fill_token_id = int(fill_token_id)
        self.noise = float(noise)
        self.noise_seed = int(noise_seed)
        self.vocab_size = vocab_size

    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        batch, device = request.batch_size, request.device
        if len(self.continuations) != batch:
            raise ValueError(f"OracleDrafter has {len(self.continuations)} continuations for {batch} rows")
        self._vocab = request.vocab_size
        width = max(1, max(len(c) for c in self.continuations))
        table = torch.full((batch, width), self.fill_token_id, dtype=torch.long)
        for row, cont in enumerate(self.continuations):
            table[row, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        self._table = table.to(device)  # [B,T]
        generator = torch.Generator().manual_seed(self.noise_seed)
        self._noisy = (torch.rand(table.shape, generator=generator) < self.noise).to(table.device)  # [B,T]
        self._lengths = torch.tensor([len(c) for c in self.continuations], device=device)

    def draft(self, step: DraftStep) -> DraftOutput:
        device = self._table.device
        index = step.num_generated.to(device)[:, None] + torch.arange(step.gamma, device=device)  # [B,γ]
        tokens = self._table.gather(1, index.clamp(max=self._table.shape[1] - 1))
        tokens = torch.where(index < self._lengths[:, None], tokens, self.fill_token_id)
        wrong = self._noisy.gather(1, index.clamp(max=self._table.shape[1] - 1)) & (index < self._lengths[:, None])
        if self.corrupt_every > 0:
            wrong |= (index + 1) % self.corrupt_every == 0
        if self.max_correct is not None:
            wrong |= torch.arange(step.gamma, device=device)[None, :] >= self.max_correct
        tokens = torch.where(wrong, (tokens + 1) % self._vocab, tokens)
        return DraftOutput(tokens=tokens)
