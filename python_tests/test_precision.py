"""Precision: dtype choice, int8 drafters, and agreement/near-tie checks for low-precision decoding."""
import copy
import warnings

import pytest
import torch

import fastspec
from fastspec import precision
from fastspec.drafters import OracleDrafter
from fastspec.errors import UserError

from conftest import _llama


def _caps(monkeypatch, **flags):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags))


def test_dtype_names_and_aliases():
    assert precision.resolve_dtype(None) is None
    assert precision.resolve_dtype("float32") is torch.float32
    assert precision.resolve_dtype("fp32") is torch.float32
    assert precision.resolve_dtype("bf16") is torch.bfloat16
    assert precision.resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert precision.resolve_dtype("float16", "cuda") is torch.float16  # no CUDA needed to name it


def test_unknown_dtype_names_the_accepted_values():
    with pytest.raises(UserError, match="unknown dtype 'int4'; accepted: auto, float32, bfloat16, float16"):
        precision.resolve_dtype("int4")
    with pytest.raises(UserError, match="not a float dtype"):
        precision.resolve_dtype(torch.int8)


def test_auto_on_cpu_follows_bf16_units(monkeypatch):
    _caps(monkeypatch, amx_bf16=True)
    assert precision.resolve_dtype("auto", "cpu") is torch.bfloat16
    _caps(monkeypatch, avx512_bf16=True)
    assert precision.resolve_dtype("auto", "cpu") is torch.bfloat16
    _caps(monkeypatch, avx2=True)
    dtype, why = precision.auto_dtype("cpu")
    assert dtype is torch.float32 and "fell back to fp32" in why


def test_fp16_on_a_cpu_without_fp16_units_is_a_user_error(monkeypatch):
    _caps(monkeypatch, avx2=True)
    with pytest.raises(UserError, match="float16 on this CPU.*accepted here: auto, float32, bfloat16"):
        precision.resolve_dtype("fp16", "cpu")
    _caps(monkeypatch, avx512_fp16=True)
    assert precision.resolve_dtype("fp16", "cpu") is torch.float16


def test_the_choice_is_printed_once(monkeypatch, capsys):
    _caps(monkeypatch, avx2=True)
    precision._announced.clear()
    for _ in range(3):
        precision.resolve_dtype("auto", "cpu", announce=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastspec: dtype auto -> float32 on cpu (the CPU has no bf16 matrix units "
                   "(no amx_bf16/avx512_bf16): fell back to fp32)"]


def test_int8_quantization_keeps_the_argmax_and_shrinks_linears():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 997)).eval()
    quantized = precision.quantize_int8(head)
    x = torch.randn(32, 64)
    with torch.no_grad():
        ref, out = head(x), quantized(x)
    assert type(quantized[2]).__module__.startswith("torch.ao.nn.quantized")
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.9
    assert torch.allclose(ref, out, atol=0.1 * float(ref.abs().max()))
    assert isinstance(head[2], torch.nn.Linear)  # the original is untouched


def test_first_divergence_and_agreement():
    assert precision.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert precision.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert precision.first_divergence([1, 2, 3], [1, 2]) == 2
    assert precision.token_agreement([1, 2, 3, 4], [1, 2, 9, 9]) == (2, 4)
    assert precision.token_agreement([1, 2], [1, 2]) == (2, 2)


def test_classify_divergence():
    logits = torch.tensor([0.0, 5.0, 4.9, 1.0])
    assert precision.classify_divergence(logits, 1, 2, 0.5) == (pytest.approx(0.1), True)
    gap, near = precision.classify_divergence(logits, 1, 3, 0.5)  # a clear loser: a bug, not numerics
    assert gap == pytest.approx(4.0) and not near
    assert precision.classify_divergence(logits, 1, -1, 0.5)[1] is False  # one output stopped early


@pytest.fixture(scope="module")
def llama_pair():
    """(fp32, bf16) copies of a 4-layer Llama with soft logits, where bf16 block and 1-token
    forwards part at near-ties on some prompts."""
    model = _llama(3001, seed=4321, hidden=128, layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    return model, copy.deepcopy(model).to(torch.bfloat16)


def _prompts(count=10):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 3001, (1, 12), generator=gen) for _ in range(count)]


def _decode_pair(model, ids, new=32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ar = fastspec.generate(model, None, ids, max_new_tokens=new).sequences[0, ids.shape[1]:].tolist()
        spec = fastspec.generate(model, OracleDrafter([ar]), ids, gamma=6, max_new_tokens=new)
    return ar, spec.sequences[0, ids.shape[1]:].tolist()


def test_fp32_speculation_stays_identical(llama_pair):
    fp32, _ = llama_pair
    for ids in _prompts(4):
        ar, spec = _decode_pair(fp32, ids)
        assert spec == ar
        assert precision.check_divergence(fp32, ar, spec, input_ids=ids) is None


def test_bf16_divergences_are_near_ties_and_an_injected_one_is_caught(llama_pair):
    _, bf16 = llama_pair
    divergences = []
    for ids in _prompts():
        ar, spec = _decode_pair(bf16, ids)
        found = precision.check_divergence(bf16, ar, spec, input_ids=ids)
        if found is not None:
            divergences.append(found)
            assert found.near_tie, f"divergence is not a near-tie: {found}"
            assert found.gap <= precision.NEAR_TIE_TOLERANCE[torch.bfloat16]
        # inject a wrong token that is not a near-tie: the check must flag it
        at = 5
        logits = precision.position_logits(bf16, ar, at, input_ids=ids)
        wrong = int(logits.argmin())
        injected = ar[:at] + [wrong] + ar[at + 1:]
        flagged = precision.check_divergence(bf16, ar, injected, input_ids=ids)
        assert flagged.position == at and not flagged.near_tie
        assert flagged.gap > precision.NEAR_TIE_TOLERANCE[torch.bfloat16]
    assert divergences, "this setup is chosen so that bf16 parts at near-ties on some prompts"


def test_position_logits_match_a_full_forward_on_t5(tiny_t5, t5_inputs):
    ids, mask = t5_inputs[0][:1], t5_inputs[1][:1]
    ar = fastspec.generate(tiny_t5, None, ids, mask, max_new_tokens=6).sequences[0, 1:].tolist()
    logits = precision.position_logits(tiny_t5, ar, 3, input_ids=ids, attention_mask=mask, decoder_start_token_id=0)
    assert int(logits.argmax()) == ar[3]
