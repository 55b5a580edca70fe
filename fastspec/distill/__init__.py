"""Distillation: KD losses, pseudo-dataset generation by the target, drafter training."""
from fastspec.distill.losses import DIVERGENCES, divergence, fkl, jsd, masked_cross_entropy, rkl, tvd

__all__ = ["DIVERGENCES", "divergence", "fkl", "rkl", "jsd", "tvd", "masked_cross_entropy"]
