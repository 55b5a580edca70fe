"""One metrics object for a speculative run: it carries raw sums only, and every figure
(α, τ, per-position acceptance, c, ideal speedup) is derived from them in one place.

Sums add up, so the metrics of many ``generate`` calls merge with ``+`` (``sum(ms, GenerationMetrics())``)
and the engine, eval and the demo all report the same α, τ and c.

Definitions (a *row-step* is one row of the batch in one verification step with γ > 0):

* accepted counts only drafts that were EMITTED: min(num_accepted, emitted − 1) per row-step, so a
  draft accepted past EOS or max_new_tokens does not count. The engine drafts at most (the most
  tokens any running row may still emit) − 1 per step, and γ below is that step's drafted γ. So
  the figures follow from the target's greedy output alone (offline replay,
  :mod:`fastspec.distill.replay`, reproduces them exactly);
* α = E[β] = Σ (accepted/γ) / row-steps (the seed's acceptance rate);
* τ = 1 + Σ accepted / row-steps: tokens emitted per target forward and row;
* c = (draft time per drafted token) / (time per verification forward of the target);
* ideal speedup = (1 − α^(γ+1)) / ((1 − α)(γc + 1)) (Leviathan et al. 2023);
* token agreement = Σ tokens reproduced before the first divergence from autoregressive decoding /
  Σ autoregressive tokens compared (filled by ``fastspec.eval``: 1.0 in fp32, may dip in bf16/fp16,
  where each divergence should be a near-tie, see :mod:`fastspec.precision`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

_DERIVED = ("acceptance_rate", "mean_accepted_length", "per_position_acceptance", "gamma", "c", "ideal_speedup",
            "engine_time_s", "token_agreement", "first_divergence", "divergence_near_tie", "divergence_gap")
_CONCATENATED = ("divergence_positions", "divergence_gaps")  # per-request lists: merged by concatenation


def ideal_speedup(alpha: float, gamma: float, c: float) -> float:
    """Leviathan et al. 2023: expected speedup of speculative decoding over autoregressive."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


@dataclass
class GenerationMetrics:
    """Raw counters of one or more requests. Attribute or item access (``m.acceptance_rate`` /
    ``m["acceptance_rate"]``) for the raw sums and the derived figures alike."""

    num_steps: int = 0  # verification forwards (decode steps)
    row_steps: int = 0  # Σ over steps with γ > 0 of the running rows
    beta_sum: float = 0.0  # Σ over row-steps of accepted/γ
    gamma_sum: int = 0  # Σ over row-steps of γ
    num_draft_tokens: int = 0  # Σ over row-steps of γ (drafted tokens)
    num_accepted_tokens: int = 0  # Σ over row-steps of accepted drafts
    position_hits: List[int] = field(default_factory=list)  # [k]: row-steps whose draft k was accepted
    position_trials: List[int] = field(default_factory=list)  # [k]: row-steps that drafted position k
    target_calls: int = 0  # every target forward: encoder, prefill, verifications
    target_time_s: float = 0.0
    verify_calls: int = 0  # decode-step forwards only (no encoder/prefill)
    verify_time_s: float = 0.0
    draft_calls: int = 0
    draft_time_s: float = 0.0
    total_time_s: float = 0.0
    num_generated_tokens: int = 0
    # agreement with autoregressive decoding on the same prompts (greedy; filled by fastspec.eval)
    agreement_tokens: int = 0  # Σ tokens equal to the autoregressive output before its first divergence
    compared_tokens: int = 0  # Σ autoregressive tokens compared
    divergences: int = 0  # requests whose output parted from the autoregressive one
    near_tie_divergences: int = 0  # ... at a near-tie of the target (numerics, not a bug)
    divergence_positions: List[int] = field(default_factory=list)  # per diverging request: first new-token index
    divergence_gaps: List[float] = field(default_factory=list)  # per diverging request: target top logit gap (nan: none)

    # ----------------------------------------------------------------- derived
    @property
    def acceptance_rate(self) -> float:
        return self.beta_sum / self.row_steps if self.row_steps else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.row_steps if self.row_steps else 1.0

    @property
    def per_position_acceptance(self) -> List[float]:
        return [h / t if t else 0.0 for h, t in zip(self.position_hits, self.position_trials)]

    @property
    def gamma(self) -> float:
        """Mean γ over row-steps (the fixed γ unless it was dynamic)."""
        return self.gamma_sum / self.row_steps if self.row_steps else 0.0

    @property
    def c(self) -> float:
        if not (self.draft_calls and self.verify_calls and self.verify_time_s > 0 and self.gamma > 0):
            return 0.0
        per_draft_token = self.draft_time_s / (self.draft_calls * self.gamma)
        return per_draft_token / (self.verify_time_s / self.verify_calls)

    @property
    def ideal_speedup(self) -> float:
        return ideal_speedup(self.acceptance_rate, self.gamma, self.c) if self.row_steps else 1.0

    @property
    def engine_time_s(self) -> float:
        """The loop's own overhead: total − draft − target."""
        return max(self.total_time_s - self.draft_time_s - self.target_time_s, 0.0)

    @property
    def token_agreement(self) -> Optional[float]:
        """Share of the autoregressive tokens reproduced before each request's first divergence (None: not compared)."""
        return self.agreement_tokens / self.compared_tokens if self.compared_tokens else None

    @property
    def first_divergence(self) -> Optional[int]:
        """The earliest first-divergence position over the requests (None: no divergence)."""
        return min(self.divergence_positions) if self.divergence_positions else None

    @property
    def divergence_near_tie(self) -> Optional[bool]:
        """True when every divergence sat at a near-tie; None when there was none."""
        return self.near_tie_divergences == self.divergences if self.divergences else None

    @property
    def divergence_gap(self) -> Optional[float]:
        """The largest target top-logit gap at a divergence (None: no divergence or no gap known)."""
        gaps = [g for g in self.divergence_gaps if g == g]
        return max(gaps) if gaps else None

    def record_divergence(self, agreeing: int, compared: int, position: Optional[int] = None,
                          gap: Optional[float] = None, near_tie: Optional[bool] = None) -> None:
        """Count one request compared with autoregressive decoding (``position`` None: identical)."""
        self.agreement_tokens += agreeing
        self.compared_tokens += compared
        if position is not None:
            self.divergences += 1
            self.near_tie_divergences += int(bool(near_tie))
            self.divergence_positions.append(int(position))
            self.divergence_gaps.append(float("nan") if gap is None else float(gap))

    # ----------------------------------------------------------------- merging and access
    def __add__(self, other: "GenerationMetrics") -> "GenerationMetrics":
        if not isinstance(other, GenerationMetrics):
            return NotImplemented
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in _CONCATENATED:
                merged[f.name] = list(a) + list(b)
            elif isinstance(a, list):
                width = max(len(a), len(b))
                a, b = a + [0] * (width - len(a)), b + [0] * (width - len(b))
                merged[f.name] = [x + y for x, y in zip(a, b)]
            else:
                merged[f.name] = a + b
        return GenerationMetrics(**merged)

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)

    def record_step(self, num_accepted: List[int], gamma: int) -> None:
        """Count one verification step in which the running rows drafted ``gamma`` tokens and
        accepted ``num_accepted`` (one int per row, emitted drafts only) of them."""
        self.num_steps += 1
        if gamma <= 0:
            return
        rows = len(num_accepted)
        self.row_steps += rows
        self.gamma_sum += gamma * rows
        self.num_draft_tokens += gamma * rows
        self.num_accepted_tokens += sum(num_accepted)
        self.beta_sum += sum(num_accepted) / gamma
        if len(self.position_hits) < gamma:
            grow = gamma - len(self.position_hits)
            self.position_hits += [0] * grow
            self.position_trials += [0] * grow
        for k in range(gamma):
            self.position_trials[k] += rows
            self.position_hits[k] += sum(1 for a in num_accepted if a > k)

    def __getitem__(self, key):
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)

    def keys(self):
        return list(self.as_dict().keys())

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update({name: getattr(self, name) for name in _DERIVED})
        return out
