"""Agreement with autoregressive decoding in the shared comparison path (fastspec.eval.compare):
fp32 agrees fully; bf16 may part, but only at near-ties; a tampered decoder is caught."""
import copy
import warnings

import pytest
import torch

import fastspec
from fastspec import precision
from fastspec.drafters import OracleDrafter, PromptLookupDrafter
from fastspec.eval import AR_NAME, Decoder, DivergenceError, agreement_table, compare
from fastspec.metrics import GenerationMetrics

from conftest import _llama


@pytest.fixture(scope="module")
def soft_llama():
    """The 4-layer Llama of test_precision: soft logits, so bf16 parts at near-ties on some prompts."""
    model = _llama(3001, seed=4321, hidden=128, layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    return model


def _prompts(count=10):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 3001, (12,), generator=gen).tolist() for _ in range(count)]


def _ar(model, ids, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fastspec.generate(model, None, ids, max_new_tokens=n).sequences


def oracle_decoder(model, gamma=6):
    """Speculative decoding with a drafter that proposes the autoregressive continuation (α ≈ 1 in fp32)."""
    def run(input_ids, max_new_tokens, **kwargs):
        ar = _ar(model, input_ids, max_new_tokens)[0, input_ids.shape[1]:].tolist()
        return fastspec.generate(model, OracleDrafter([ar]), input_ids, gamma=gamma, max_new_tokens=max_new_tokens).sequences
    return Decoder("oracle", generate_fn=run)


def tampered_decoder(model, at=3):
    """A broken decoder: the autoregressive output with token ``at`` replaced by the target's worst token."""
    def run(input_ids, max_new_tokens, **kwargs):
        seq = _ar(model, input_ids, max_new_tokens).clone()
        new = seq[0, input_ids.shape[1]:].tolist()
        worst = int(precision.position_logits(model, new, at, input_ids=input_ids).argmin())
        seq[0, input_ids.shape[1] + at] = worst
        return seq
    return Decoder("tampered", generate_fn=run)


def _row(result, name):
    return next(r for r in result.rows if r["name"] == name)


def test_fp32_agreement_is_one_and_no_divergence(tiny_llama):
    result = compare(tiny_llama, [Decoder("pl", PromptLookupDrafter(), 4)], _prompts(3), max_new_tokens=10, gamma=4,
                     progress=False, strict=True)
    for row in result.rows:
        assert row["token_agreement"] == 1.0 and row["divergences"] == 0
        assert row["first_divergence"] is None and row["divergence_near_tie"] is None and row["divergence_gap"] is None
        assert row["near_tie_tolerance"] == precision.NEAR_TIE_TOLERANCE[torch.float32]
    assert result.exact and result.mismatches() == []


def test_bf16_divergences_are_near_ties(soft_llama):
    bf16 = copy.deepcopy(soft_llama).to(torch.bfloat16)
    result = compare(bf16, [oracle_decoder(bf16)], _prompts(), max_new_tokens=32, gamma=6, progress=False, strict=True)
    row = _row(result, "oracle")
    assert row["divergences"] >= 1, "this setup parts at near-ties on some prompts (see test_precision)"
    assert row["identical"] is False and row["divergence_near_tie"] is True
    assert row["divergence_gap"] <= precision.NEAR_TIE_TOLERANCE[torch.bfloat16] == row["near_tie_tolerance"]
    assert 0 < row["token_agreement"] < 1 and row["first_divergence"] == min(row["divergence_positions"])
    assert len(row["divergence_positions"]) == row["divergences"]
    assert not result.exact and result.mismatches() == []  # near-ties are numerics, not bugs
    assert _row(result, AR_NAME)["token_agreement"] == 1.0
    table = agreement_table(result.rows)
    assert "token agreement with AR" in table and "yes (max gap" in table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_divergence_that_is_not_a_near_tie_fails(soft_llama, dtype):
    model = copy.deepcopy(soft_llama).to(dtype)
    prompts = _prompts(2)
    result = compare(model, [tampered_decoder(model)], prompts, max_new_tokens=8, gamma=4, progress=False)
    row = _row(result, "tampered")
    assert row["divergences"] == 2 and row["divergence_positions"] == [3, 3] and row["first_divergence"] == 3
    assert row["divergence_near_tie"] is False and row["divergence_gap"] > row["near_tie_tolerance"]
    assert row["token_agreement"] == pytest.approx(3 / 8)
    assert result.mismatches() == ["tampered"]
    with pytest.raises(DivergenceError, match="tampered .first at 3"):
        result.check_agreement()
    with pytest.raises(DivergenceError):
        compare(model, [tampered_decoder(model)], prompts, max_new_tokens=8, gamma=4, progress=False, strict=True)
    assert "NO (max gap" in agreement_table(result.rows)


def test_sampling_rows_carry_no_agreement(tiny_llama):
    result = compare(tiny_llama, [Decoder("pl", PromptLookupDrafter(), 4)], _prompts(2), max_new_tokens=6, gamma=4,
                     generate_kwargs={"do_sample": True, "seed": 1}, progress=False)
    assert all(r["token_agreement"] is None and r["near_tie_tolerance"] is None for r in result.rows)


def test_agreement_sums_merge_with_plus():
    a, b = GenerationMetrics(), GenerationMetrics()
    a.record_divergence(10, 10)
    a.record_divergence(4, 10, position=4, gap=0.1, near_tie=True)
    b.record_divergence(7, 10, position=7, gap=3.0, near_tie=False)
    m = sum([a, b], GenerationMetrics())
    assert (m.agreement_tokens, m.compared_tokens, m.divergences, m.near_tie_divergences) == (21, 30, 2, 1)
    assert m.divergence_positions == [4, 7] and m.first_divergence == 4
    assert m.token_agreement == pytest.approx(0.7) and m.divergence_near_tie is False and m.divergence_gap == 3.0
    assert (a + GenerationMetrics()).divergence_near_tie is True
    assert GenerationMetrics().token_agreement is None and GenerationMetrics().divergence_near_tie is None
    assert m.as_dict()["token_agreement"] == pytest.approx(0.7)
