"""fastspec.grouped_attention: grouped-query SDPA over multi-token blocks without the KV copy,
equal to transformers' own SDPA path, scoped to a ``with`` block, lossless inside generate."""
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import fastspec
from fastspec.grouped_attention import NAME, grouped_attention, grouped_sdpa


class _Module(torch.nn.Module):  # what transformers passes as `module`
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _block(batch, heads, kv_heads, width, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, width, 16, generator=gen)
    k = torch.randn(batch, kv_heads, length, 16, generator=gen)
    v = torch.randn(batch, kv_heads, length, 16, generator=gen)
    # causal block after length - width cached tokens; row 1 has 3 left pads
    keep = torch.arange(length)[None, :] <= torch.arange(length - width, length)[:, None]  # [W,L]
    mask = keep[None, None].repeat(batch, 1, 1, 1)
    if batch > 1:
        mask[1, :, :, :3] = False
    return q, k, v, mask


@pytest.mark.parametrize("batch, heads, kv_heads, width", [(1, 9, 3, 5), (3, 4, 2, 2), (3, 8, 1, 7), (2, 6, 3, 1)])
def test_equals_transformers_sdpa(batch, heads, kv_heads, width):
    q, k, v, mask = _block(batch, heads, kv_heads, width, 40)
    module = _Module(heads // kv_heads)
    for m in (mask, torch.where(mask, 0.0, torch.finfo(torch.float32).min)):  # bool and additive masks
        want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.25)
        got, weights = grouped_sdpa(module, q, k, v, m, scaling=0.25)
        assert got.shape == (batch, width, heads, 16) and weights is None
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_falls_back_without_groups_or_mask():
    q, k, v, mask = _block(1, 4, 4, 3, 10)
    want, _ = sdpa_attention_forward(_Module(1), q, k, v, mask, scaling=0.25)
    assert torch.equal(grouped_sdpa(_Module(1), q, k, v, mask, scaling=0.25)[0], want)
    q, k, v, _ = _block(1, 4, 2, 1, 10)
    want, _ = sdpa_attention_forward(_Module(2), q, k, v, None, scaling=0.25)
    assert torch.equal(grouped_sdpa(_Module(2), q, k, v, None, scaling=0.25)[0], want)


def test_switch_is_scoped(tiny_llama, tiny_t5):
    assert tiny_llama.config._attn_implementation == "sdpa"
    with grouped_attention(tiny_llama) as switched:
        assert switched and tiny_llama.config._attn_implementation == NAME
    assert tiny_llama.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), grouped_attention(tiny_llama):
        raise RuntimeError("boom")
    assert tiny_llama.config._attn_implementation == "sdpa"
    with grouped_attention(tiny_llama, enabled=False) as switched:
        assert not switched
    with grouped_attention(tiny_t5) as switched:  # no grouped-query heads
        assert not switched


def test_generate_uses_it_and_stays_lossless(tiny_llama, llama_inputs, monkeypatch):
    from fastspec.drafters import PromptLookupDrafter
    import fastspec.grouped_attention as grouped

    ids, mask = llama_inputs[0][:3], llama_inputs[1][:3]
    reference = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    widths = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(grouped.torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: widths.append(q.shape[2]) or real(q, *a, **k))
    for gamma in (1, 4):
        out = fastspec.generate(tiny_llama, PromptLookupDrafter(max_n=2), ids, mask, gamma=gamma, max_new_tokens=12)
        assert torch.equal(out.sequences, reference), gamma
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert widths and max(widths) > 2 and all(w % 2 == 0 for w in widths if w > 1)  # g = 2 stacked rows
    off = fastspec.generate(tiny_llama, PromptLookupDrafter(max_n=2), ids, mask, gamma=4, max_new_tokens=12,
                            grouped_attention=False)
    assert torch.equal(off.sequences, reference)
