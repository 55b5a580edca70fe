"""Bootstrap confidence intervals over prompts for α and for ratios of α.

α over a set of prompts is a ratio of sums (Σ_prompts Σ_steps β / Σ_prompts row-steps, see
:class:`fastspec.metrics.GenerationMetrics`), so a resample redraws whole prompts with
replacement and recomputes both sums. A ratio of two cells (distilled / baseline) is paired: both
cells are scored on the same prompts, so each resample uses the same draw for both.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from fastspec.errors import UserError


def resample_indices(num_prompts: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, num_prompts] prompt indices drawn with replacement (fixed by ``seed``)."""
    if num_prompts < 1 or resamples < 1:
        raise UserError(f"bootstrap needs ≥ 1 prompt and ≥ 1 resample, got {num_prompts} and {resamples}")
    return np.random.default_rng(seed).integers(0, num_prompts, size=(resamples, num_prompts))


def ratio_of_sums(numerator: Sequence[float], denominator: Sequence[float], index: np.ndarray) -> np.ndarray:
    """Per resample: Σ numerator / Σ denominator over its prompts. numerator/denominator [P],
    index [R,P] -> [R] (nan where the denominator sums to 0)."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise UserError(f"per-prompt sums must be two [P] arrays, got {num.shape} and {den.shape}")
    top, bottom = num[index].sum(axis=1), den[index].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """The central ``level`` interval of the finite ``samples`` (None, None if there are none)."""
    finite = np.asarray(samples, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None, None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def alpha_interval(beta_sums: Sequence[float], row_steps: Sequence[float], index: np.ndarray,
                   level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Bootstrap interval of α from per-prompt Σβ and row-steps [P]."""
    return percentile_interval(ratio_of_sums(beta_sums, row_steps, index), level)


def ratio_interval(cell: Tuple[Sequence[float], Sequence[float]], base: Tuple[Sequence[float], Sequence[float]],
                   index: np.ndarray, level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Paired bootstrap interval of α(cell) / α(base); each is (per-prompt Σβ, per-prompt row-steps)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ratio_of_sums(*cell, index) / ratio_of_sums(*base, index)
    return percentile_interval(ratios, level)


__all__ = ["resample_indices", "ratio_of_sums", "percentile_interval", "alpha_interval", "ratio_interval"]
