"""RandomDrafter: uniform random draft tokens, for testing the loop at low acceptance."""
from __future__ import annotations

from typing import Optional

import torch

from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep


class RandomDrafter(Drafter):
    """Drafts γ tokens uniformly at random from its own seeded generator.

    deterministic=False: returns q = uniform (the distribution it really sampled from).
    deterministic=True: returns probs=None, so the verifier treats q as one-hot at the draft;
    still lossless because the draft is independent of the verifier's randomness.
    """

    def __init__(self, vocab_size: Optional[int] = None, seed: int = 0, deterministic: bool = False):
        self.vocab_size = vocab_size
        self.seed = seed
        self.deterministic = deterministic

    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        self._vocab = request.vocab_size
        self._device = request.device
        self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(self.seed)

    def draft(self, step: DraftStep) -> DraftOutput:
        batch = step.num_generated.shape[0]
        tokens = torch.randint(
            0, self._vocab, (batch, step.gamma), generator=self._generator, device=self._device
        )  # [B,γ]
        if self.deterministic:
            return DraftOutput(tokens=tokens)
        probs = torch.full((batch, step.gamma, self._vocab), 1.0 / self._vocab, device=self._device)  # [B,γ,V]
        return DraftOutput(tokens=tokens, probs=probs)
