"""The only place that touches HF cache internals (their API moves between releases).

setup.py pins transformers 5.x, whose ``Cache.crop(k)`` takes a NEGATIVE k (tokens to remove;
a positive k raises). Every crop in fastspec goes through :func:`crop_cache`.
"""
from __future__ import annotations

import inspect

import torch


def cache_length(cache) -> int:
    """Number of positions held by the (self-attention) cache; 0 for None."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def crop_cache(cache, new_length: int) -> None:
    """Crop a DynamicCache / EncoderDecoderCache (self-attention part) to ``new_length`` positions."""
    current = cache_length(cache)
    if new_length > current or new_length < 0:
        raise ValueError(f"cannot crop a cache of length {current} to {new_length}")
    if new_length == current:
        return
    cache.crop(new_length - current)  # negative: tokens to remove


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep only batch rows ``rows`` ([b] int64) of every cache layer, in place."""
    if cache is not None and cache_length(cache) > 0:
        cache.batch_select_indices(rows)


def new_cache(model):
    """An empty cache of the type the model's generate() would use (dynamic, croppable)."""
    from transformers import DynamicCache, EncoderDecoderCache

    config = model.config
    if config.is_encoder_decoder:
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def cache_kwarg(module) -> str:
    """The forward argument that takes the KV cache: ``cache`` from transformers 5.2x on (which
    deprecates ``past_key_values`` with a FutureWarning on every call), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
