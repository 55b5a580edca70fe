"""Drafters: one per file, all behind the protocol in :mod:`fastspec.drafters.base`."""
from fastspec.drafters.base import CommitInfo, DraftOutput, Drafter, DraftRequest, DraftStep, SamplingParams
from fastspec.drafters.oracle import OracleDrafter
from fastspec.drafters.random_drafter import RandomDrafter

__all__ = ["Drafter", "DraftRequest", "DraftStep", "DraftOutput", "CommitInfo", "SamplingParams", "RandomDrafter", "OracleDrafter"]
