"""Grouped-query attention over a multi-token block without copying the KV cache.

For a block of W > 1 new tokens after a cache, transformers' SDPA path passes a mask, and with a
mask it expands every layer's whole K/V cache from the KV heads to all query heads (``repeat_kv``)
before calling SDPA: on SmolLM2 (9 query heads, 3 KV heads) that copy is ≈ 7 ms of a 90 ms verify
forward on a 2-core CPU, and grows with the cache. Here the g query heads that share a KV head
are stacked along the query axis instead ([B, H_kv, g·W, D]) with the mask repeated g times, so
SDPA reads the cache as it is. Each query row still sees exactly its own keys and mask row.

:func:`grouped_attention` switches a model to it for a ``with`` block (``config._attn_implementation``,
restored on exit); the engine uses it inside ``fastspec.generate``, never for HF's own ``generate``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "fastspec_grouped_sdpa"


def grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                 **kwargs):
    """transformers' attention-function signature. query [B,H,W,D]; key, value [B,H_kv,L,D];
    attention_mask [B,1,W,L] (bool or additive) or None. Returns ([B,W,H,D], None)."""
    batch, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    if groups == 1 or attention_mask is None or dropout or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # head h = kv·g + j (transformers' repeat_kv order) -> row j·W + w of KV head kv
    stacked = query.reshape(batch, key.shape[1], groups * width, dim)
    mask = attention_mask[:, :, :, : key.shape[-2]].repeat(1, 1, groups, 1)  # [B,1,g·W,L]
    out = torch.nn.functional.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, width, dim).transpose(1, 2).contiguous(), None


# registered once, under our own name: transformers' "sdpa" entry (HF's own generate) is untouched
AttentionInterface.register(NAME, grouped_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def _uses_grouped_query_sdpa(config) -> bool:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa" and isinstance(heads, int)
            and isinstance(kv_heads, int) and 0 < kv_heads < heads)


@contextlib.contextmanager
def grouped_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run ``model``'s grouped-query SDPA attention through :func:`grouped_sdpa` inside the block;
    yields whether it switched (only SDPA models with fewer KV heads than query heads)."""
    config = getattr(model, "config", None)
    switch = bool(enabled and config is not None and _uses_grouped_query_sdpa(config))
    if switch:
        config._attn_implementation = NAME
    try:
        yield switch
    finally:
        if switch:
            config._attn_implementation = "sdpa"
