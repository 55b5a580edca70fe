"""fastspec.cache.GrowableLayer (in-place appends into a buffer with spare capacity) against
transformers' DynamicLayer (re-concatenation): the same keys/values after every operation the
engine and HF use, the same logits through a model, and the engine really uses it."""
import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import fastspec
from fastspec.cache import GrowableLayer, cache_kwarg, crop_cache, new_cache
from fastspec.drafters import RandomDrafter


def _kv(batch, width, generator):
    return (torch.randn(batch, 3, width, 8, generator=generator), torch.randn(batch, 3, width, 8, generator=generator))


def _assert_same(grown, plain):
    assert grown.get_seq_length() == plain.get_seq_length()
    assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)


def test_growable_layer_matches_dynamic_layer_through_appends_crops_and_row_selection():
    generator = torch.Generator().manual_seed(0)
    grown, plain = GrowableLayer(), DynamicLayer()
    batch = 4
    # widths cross several growths (first capacity 64 + width); crops interleave as in the engine
    for step, width in enumerate([70, 1, 5, 3, 40, 1, 1, 9, 120, 2]):
        keys, values = _kv(batch, width, generator)
        got, want = grown.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        _assert_same(grown, plain)
        if step % 3 == 1:
            grown.crop(-2)
            plain.crop(-2)
            _assert_same(grown, plain)
    rows = torch.tensor([3, 0, 2])
    grown.batch_select_indices(rows)
    plain.batch_select_indices(rows)
    _assert_same(grown, plain)
    keys, values = _kv(3, 4, generator)  # appends after a row selection keep working
    grown.update(keys, values)
    plain.update(keys, values)
    _assert_same(grown, plain)
    grown.reorder_cache(torch.tensor([2, 2, 1]))
    plain.reorder_cache(torch.tensor([2, 2, 1]))
    _assert_same(grown, plain)
    grown.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    _assert_same(grown, plain)
    grown.crop(-grown.get_seq_length())
    assert grown.get_seq_length() == 0 and grown.keys.shape[-2] == 0


def test_growable_layer_append_is_in_place_until_full():
    layer = GrowableLayer()
    layer.update(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    buffer = layer._key_buffer
    capacity = buffer.shape[-2]
    assert capacity >= 10 + GrowableLayer.MIN_SPARE
    for _ in range(capacity - 10):
        layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert layer._key_buffer is buffer  # no copy while the spare capacity lasts
    layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert layer._key_buffer is not buffer and layer.get_seq_length() == capacity + 1
    assert torch.equal(layer.keys[..., :10, :], torch.zeros(1, 1, 10, 2))


def test_growable_layer_refuses_positive_crop():
    layer = GrowableLayer()
    layer.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    assert layer.get_seq_length() == 3


def test_new_cache_uses_growable_self_attention_layers(tiny_llama, tiny_t5):
    assert {type(layer) for layer in new_cache(tiny_llama).layers} == {GrowableLayer}
    seq2seq = new_cache(tiny_t5)
    assert {type(layer) for layer in seq2seq.self_attention_cache.layers} == {GrowableLayer}
    assert {type(layer) for layer in seq2seq.cross_attention_cache.layers} == {DynamicLayer}


@torch.no_grad()
def test_model_logits_equal_with_growable_and_dynamic_cache(tiny_llama):
    ids = torch.randint(3, tiny_llama.config.vocab_size, (2, 120), generator=torch.Generator().manual_seed(1))
    caches = [new_cache(tiny_llama), DynamicCache(config=tiny_llama.config)]
    kw = cache_kwarg(tiny_llama)
    for cache in caches:
        tiny_llama(input_ids=ids[:, :100], use_cache=True, **{kw: cache})
    start = 100
    for width, keep in [(5, 2), (1, 1), (7, 3), (4, 4)]:
        logits = [tiny_llama(input_ids=ids[:, start:start + width], use_cache=True, **{kw: c}).logits
                  for c in caches]
        assert torch.equal(logits[0], logits[1])
        for cache in caches:
            crop_cache(cache, start + keep)
        start += keep


@pytest.mark.parametrize("inplace", [True, False])
def test_engine_decodes_through_growable_layers_unless_switched_off(tiny_llama, monkeypatch, inplace):
    calls = []
    update = GrowableLayer.update

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[-2])
        return update(self, *args, **kwargs)

    monkeypatch.setattr(GrowableLayer, "update", counted)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]])
    out = fastspec.generate(tiny_llama, RandomDrafter(seed=0), ids, gamma=3, max_new_tokens=6, eos_token_id=None,
                            inplace_cache=inplace)
    want = tiny_llama.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out.sequences, want)
    if inplace:
        assert calls and max(calls) >= 4  # prefill and (γ+1)-token verify blocks went through it
    else:
        assert calls == []
