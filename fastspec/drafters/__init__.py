"""Drafters: one per file, all behind the protocol in :mod:`fastspec.drafters.base`."""
from fastspec.drafters.base import CommitInfo, DraftOutput, Drafter, DraftRequest, DraftStep, SamplingParams
from fastspec.drafters.oracle import OracleDrafter
from fastspec.drafters.random_drafter import RandomDrafter
from fastspec.drafters.ngram import NgramDrafter
from fastspec.drafters.prompt_lookup import PromptLookupDrafter
from fastspec.drafters.cnn import CNNDrafter
from fastspec.drafters.lstm import LSTMDrafter
from fastspec.drafters.hf import HFDrafter
from fastspec.drafters.layer_skip import LayerSkipDrafter
from fastspec.drafters.ensemble import EnsembleDrafter
from fastspec.drafters.feature import FeatureDrafter
from fastspec.drafters.io import load_drafter

__all__ = ["Drafter", "DraftRequest", "DraftStep", "DraftOutput", "CommitInfo", "SamplingParams", "RandomDrafter", "OracleDrafter",
           "NgramDrafter", "PromptLookupDrafter", "CNNDrafter", "LSTMDrafter", "HFDrafter", "LayerSkipDrafter",
           "EnsembleDrafter", "FeatureDrafter", "load_drafter"]
