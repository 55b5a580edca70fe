"""EnsembleDrafter: a cost-aware UCB bandit choosing one of several drafters at every step.

Each step the ensemble picks an arm (a drafter), lets it draft, and reads the verify result at
``commit``. The reward of a step is **tokens emitted per second**: (1 + mean accepted drafts over
the active rows) / (the arm's draft time + the time the target took between ``draft`` returning
and ``commit`` being called). So a cheap drafter with fair acceptance can beat an expensive
accurate one. With ``cost_aware=False`` the reward is the acceptance β = accepted / γ.

Timing makes the arm choice depend on the machine (still lossless: a choice never depends on the
verifier's random draws, only on past steps). Pass ``costs`` (relative seconds per step, one per
arm) for reproducible choices, e.g. under a seed with sampling.

Arm choice is UCB1 on rewards normalised by the best arm's mean:
``score_i = mean_i / max_j mean_j + exploration * sqrt(2 ln N / n_i)`` (untried arms first).
Statistics persist across requests (a prior for the next one) unless ``reset_per_request``.
Only the chosen drafter gets ``commit``; stateful drafters (LSTM, HF caches) resync themselves
from the committed tokens when they are next chosen.
"""
from __future__ import annotations

import math
import os
import time
from typing import List, Optional, Sequence

import torch

from fastspec.drafters.base import CommitInfo, DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.folder import save_folder
from fastspec.errors import UserError


class EnsembleDrafter(Drafter):
    def __init__(
        self,
        drafters: Sequence[Drafter],
        *,
        exploration: float = 0.5,
        cost_aware: bool = True,
        reset_per_request: bool = False,
        names: Optional[Sequence[str]] = None,
        costs: Optional[Sequence[float]] = None,
    ):
        if len(drafters) < 1:
            raise ValueError("EnsembleDrafter needs at least one drafter")
        vocabs = {d.vocab_size for d in drafters if d.vocab_size is not None}
        if len(vocabs) > 1:
            raise ValueError(f"ensemble drafters disagree on the vocabulary size: {sorted(vocabs)}")
        self.drafters: List[Drafter] = list(drafters)
        self.names = list(names) if names is not None else [type(d).__name__ for d in drafters]
        self.vocab_size = vocabs.pop() if vocabs else None
        self.exploration = float(exploration)
        self.cost_aware = bool(cost_aware)
        self.reset_per_request = bool(reset_per_request)
        if costs is not None and (len(costs) != len(drafters) or any(float(c) <= 0 for c in costs)):
            raise ValueError("costs must hold one positive number per drafter")
        self.costs = [float(c) for c in costs] if costs is not None else None
        self.reset_stats()

    @property
    def deterministic(self) -> bool:
        return all(d.deterministic for d in self.drafters)

    def reset_stats(self) -> None:
        k = len(self.drafters)
        self.pulls = [0] * k
        self.reward_sum = [0.0] * k  # cost-aware: Σ emitted tokens; else Σ β
        self.seconds_sum = [0.0] * k  # cost-aware: Σ step seconds
        self.accepted_sum = [0.0] * k
        self.draft_tokens = [0] * k
        self.history: List[int] = []  # chosen arm per step

    def choose(self) -> int:
        for arm, n in enumerate(self.pulls):
            if n == 0:
                return arm
        means = self._mean_rewards()
        best = max(means) or 1.0
        total = sum(self.pulls)
        scores = [
            m / best + self.exploration * math.sqrt(2.0 * math.log(total) / n) for m, n in zip(means, self.pulls)
        ]
        return max(range(len(scores)), key=lambda i: scores[i])

    # ------------------------------------------------------------------ protocol
    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        if self.reset_per_request:
            self.reset_stats()
        for d in self.drafters:
            d.begin(request)
        self._step = None

    def draft(self, step: DraftStep) -> DraftOutput:
        arm = self.choose()
        start = time.perf_counter()
        out = self.drafters[arm].draft(step)
        done = time.perf_counter()
        self._step = (arm, done - start, done, int(step.gamma))
        self.history.append(arm)
        if out.probs is None and not self.deterministic and self.request.sampling.do_sample:
            # mixed ensemble under sampling: a deterministic arm's q is one-hot at its draft
            out = DraftOutput(tokens=out.tokens, probs=torch.nn.functional.one_hot(out.tokens, self.request.vocab_size).float())
        return out

    def commit(self, info: CommitInfo) -> None:
        if self._step is None:
            return
        arm, draft_s, drafted_at, gamma = self._step
        self._step = None
        verify_s = time.perf_counter() - drafted_at
        active = info.active.bool()
        accepted = float(info.num_accepted[active].float().mean()) if bool(active.any()) else 0.0
        if self.cost_aware:
            # tokens/s as a ratio of sums: one preempted step cannot sink an arm's estimate
            self.seconds_sum[arm] += self.costs[arm] if self.costs is not None else draft_s + verify_s
            reward = 1.0 + accepted
        else:
            reward = accepted / max(gamma, 1)
        self.pulls[arm] += 1
        self.reward_sum[arm] += reward
        self.accepted_sum[arm] += accepted
        self.draft_tokens[arm] += gamma
        self.drafters[arm].commit(info)

    def _mean_rewards(self) -> List[float]:
        if self.cost_aware:
            return [r / max(t, 1e-9) if n else 0.0 for r, t, n in zip(self.reward_sum, self.seconds_sum, self.pulls)]
        return [r / n if n else 0.0 for r, n in zip(self.reward_sum, self.pulls)]

    def end(self) -> None:
        for d in self.drafters:
            d.end()
        super().end()

    def stats(self) -> dict:
        """Per arm: pulls, mean reward, acceptance rate α."""
        return {
            name: {"pulls": n, "mean_reward": m, "alpha": (a / t) if t else 0.0}
            for name, n, m, a, t in zip(self.names, self.pulls, self._mean_rewards(), self.accepted_sum, self.draft_tokens)
        }

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        subdirs = []
        for i, d in enumerate(self.drafters):
            sub = f"drafter_{i}"
            d.save(os.path.join(folder, sub))
            subdirs.append(sub)
        config = {"drafters": subdirs, "names": self.names, "exploration": self.exploration,
                  "cost_aware": self.cost_aware, "reset_per_request": self.reset_per_request, "costs": self.costs}
        save_folder(folder, "ensemble", config)

    @classmethod
    def from_config(cls, config: dict, drafters: Sequence[Drafter], folder: str = "") -> "EnsembleDrafter":
        """The ensemble saved with ``config`` around its loaded ``drafters`` (``fastspec.drafters.io.load_drafter``
        loads the members, whose kinds it knows)."""
        if not drafters:
            raise UserError(f"corrupted ensemble config in {folder!r}: no member drafters")
        try:
            return cls(drafters, names=config["names"], exploration=float(config["exploration"]),
                       cost_aware=bool(config["cost_aware"]), reset_per_request=bool(config["reset_per_request"]),
                       costs=config.get("costs"))
        except (KeyError, TypeError) as e:
            raise UserError(f"corrupted ensemble config in {folder!r}: {e}") from None


__all__ = ["EnsembleDrafter"]
