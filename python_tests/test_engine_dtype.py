"""Engine numerics: the verify path keeps the target's logits in the model's dtype (no float32
copy of [b,γ+1,V]); the fused ops upcast inside, and the processors work on 16-bit logits too."""
import copy

import pytest
import torch

import fastspec
from fastspec import ops
from fastspec.drafters import PromptLookupDrafter, RandomDrafter

PROMPT = [[5, 9, 14, 3, 77, 5, 9, 14, 21, 8]]


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama):
    return copy.deepcopy(tiny_llama).to(torch.bfloat16)


def _spy(monkeypatch):
    """Record the dtype of every logits tensor the loop hands to the fused verify op."""
    seen = []
    real = ops.fused_verify

    def spy(target_logits, *args, **kwargs):
        seen.append(target_logits.dtype)
        return real(target_logits, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_verify", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_sees_the_model_dtype_and_greedy_matches_hf(tiny_llama, bf16_llama, monkeypatch, dtype):
    model = bf16_llama if dtype == torch.bfloat16 else tiny_llama
    ids = torch.tensor(PROMPT)
    hf = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    seen = _spy(monkeypatch)
    ar = fastspec.generate(model, None, ids, max_new_tokens=16, eos_token_id=None)
    spec = fastspec.generate(model, PromptLookupDrafter(max_n=2), ids, gamma=4, max_new_tokens=16,
                             eos_token_id=None)
    assert set(seen) == {dtype}
    assert torch.equal(ar.sequences, hf)
    assert torch.equal(spec.sequences, hf)


def test_bf16_sampling_with_processors_runs(bf16_llama, monkeypatch):
    seen = _spy(monkeypatch)
    ids = torch.tensor(PROMPT).repeat(4, 1)
    out = fastspec.generate(bf16_llama, RandomDrafter(seed=3), ids, gamma=3, do_sample=True, max_new_tokens=12,
                            eos_token_id=None, seed=7, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2,
                            no_repeat_ngram_size=2, suppress_tokens=[3, 4], min_new_tokens=2)
    assert set(seen) == {torch.bfloat16}
    new = out.sequences[:, len(PROMPT[0]):]
    assert new.shape == (4, 12) and bool((new >= 0).all()) and bool((new < 3001).all())
    assert not bool(torch.isin(new, torch.tensor([3, 4])).any())
    for row in new.tolist():  # no repeated bigram
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_bf16_beam_search_runs(bf16_llama):
    out = fastspec.generate(bf16_llama, None, torch.tensor(PROMPT), num_beams=3, max_new_tokens=6, eos_token_id=None)
    assert out.sequences.shape == (1, len(PROMPT[0]) + 6)
