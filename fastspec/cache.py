"""The only place that touches HF cache internals (their API moves between releases).

setup.py pins transformers 5.x, whose ``Cache.crop(k)`` takes a NEGATIVE k (tokens to remove;
a positive k raises). Every crop in fastspec goes through :func:`crop_cache`.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer


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


def supports_holes(cache) -> bool:
    """Whether masked columns ("holes") may sit between a row's cached tokens: only where every
    self-attention layer is a plain dynamic layer (a sliding window counts columns, not tokens)."""
    return all(type(layer) in (DynamicLayer, GrowableLayer) for layer in getattr(cache, "layers", [None]))


def gather_cache_columns(cache, columns: torch.Tensor) -> None:
    """Keep, for every row b, the cache columns ``columns[b]`` in that order ([B,L'] int64; every
    layer becomes L' long). Compacts a cache with holes."""
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        index = columns.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        keys, values = layer.keys.gather(2, index), layer.values.gather(2, index)
        if isinstance(layer, GrowableLayer):
            layer.replace(keys, values)
        else:
            layer.keys, layer.values = keys, values


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of a buffer with spare capacity along the sequence.

    DynamicLayer re-concatenates the whole layer cache on every forward (an O(cache) copy per layer
    per step, which grows with the prompt). Here an append writes only the new positions in place; a
    crop just shortens the view. The buffer grows by half its size when full (amortised O(new
    tokens)). ``keys``/``values`` stay [B,H,L,D] views with unit stride on D, so attention reads
    exactly the values a DynamicLayer would hold; their length is the cache length
    (DynamicLayer.get_seq_length).
    """

    GROWTH = 1.5
    MIN_SPARE = 64

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None  # [B,H,capacity,D]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._grow(key_states, value_states, end)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self._view(end)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        capacity = max(int(needed * self.GROWTH), needed + self.MIN_SPARE)
        keys = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
        length = self.get_seq_length()
        if length:  # before the first append keys/values are DynamicLayer's empty 1-D tensors
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def _view(self, length: int) -> None:
        """Point keys/values at the buffers' first ``length`` positions."""
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make keys/values [B,H,L',D] (L' ≤ capacity) the layer's content, in its buffers."""
        self._key_buffer[..., : keys.shape[-2], :] = keys
        self._value_buffer[..., : values.shape[-2], :] = values
        self._view(keys.shape[-2])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._view(max(self.get_seq_length() + tokens_to_remove, 0))

    def _select_rows(self, pick) -> None:
        """Apply ``pick`` (a [B,...] -> [B',...] row map) to the buffers, keeping the spare capacity."""
        if self.is_initialized:
            length = self.get_seq_length()
            self._key_buffer, self._value_buffer = pick(self._key_buffer), pick(self._value_buffer)
            self._view(length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))


def _growable(cache):
    """``cache`` with its plain DynamicLayers replaced by GrowableLayers (sliding-window and other
    layer kinds keep their own class)."""
    cache.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def new_cache(model, inplace: bool = True):
    """An empty cache of the type the model's generate() would use (dynamic, croppable); with
    ``inplace``, its self-attention layers append in place (:class:`GrowableLayer`)."""
    config = model.config
    self_attention = DynamicCache(config=config)
    if inplace:
        self_attention = _growable(self_attention)
    if config.is_encoder_decoder:
        # cross-attention K/V are written once per request: no appends to save
        return EncoderDecoderCache(self_attention, DynamicCache(config=config))
    return self_attention


def cache_kwarg(module) -> str:
    """The forward argument that takes the KV cache: ``cache`` from transformers 5.2x on (which
    deprecates ``past_key_values`` with a FutureWarning on every call), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
