"""int8 drafters (fastspec.drafters.io.quantize_drafter): every kind still drafts valid tokens, the
engine stays lossless with them, the quantized modules are torch.ao's, and the target is never touched."""
import copy
import warnings

import pytest
import torch

import fastspec
from fastspec import precision
from fastspec.drafters import CNNDrafter, HFDrafter, LayerSkipDrafter, LSTMDrafter, PromptLookupDrafter
from fastspec.drafters.feature import FeatureDrafter
from fastspec.drafters.io import load_drafter, quantize_drafter
from fastspec.errors import UserError

from conftest import _llama

QLINEAR = "torch.ao.nn.quantized.dynamic.modules.linear"


def _is_qlinear(module) -> bool:
    return type(module).__module__ == QLINEAR and type(module).__name__ == "Linear"


def _generate(target, drafter, ids, mask, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fastspec.generate(target, drafter, ids, mask, max_new_tokens=12, **kwargs)


def _lossless(target, drafter, inputs, gamma=4):
    ids, mask = inputs
    ar = _generate(target, None, ids, mask).sequences
    out = _generate(target, drafter, ids, mask, gamma=gamma)
    assert torch.equal(out.sequences, ar)
    assert out.metrics.num_draft_tokens > 0
    return out


def _llama_drafters(target):
    torch.manual_seed(0)
    return {
        "cnn": CNNDrafter.from_target(target, dim=32, num_layers=2),
        "lstm": LSTMDrafter.from_target(target, dim=32, hidden_size=32),
        "feature": FeatureDrafter.from_target(target),
        "hf": HFDrafter(_llama(3001, seed=5, hidden=32, layers=1)),
        "layer_skip": LayerSkipDrafter(target, 1),
    }


@pytest.mark.parametrize("kind", ["cnn", "lstm", "feature", "hf", "layer_skip"])
def test_int8_drafter_is_lossless_on_a_causal_target(kind, tiny_llama, llama_inputs):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    drafter = _llama_drafters(tiny_llama)[kind]
    quantized = quantize_drafter(drafter)
    assert quantized is not drafter and quantized.quantized
    _lossless(tiny_llama, quantized, (llama_inputs[0][:4], llama_inputs[1][:4]))
    # the target keeps its float modules and weights (layer skip quantizes a copy of its layers)
    assert all(isinstance(m, torch.nn.Linear) and not _is_qlinear(m) for m in tiny_llama.modules()
               if type(m).__name__ == "Linear")
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    # and the original drafter is untouched
    assert not precision.is_quantized(drafter.model)


def test_the_quantized_modules_of_each_kind(tiny_llama):
    drafters = {k: quantize_drafter(d) for k, d in _llama_drafters(tiny_llama).items()}
    assert _is_qlinear(drafters["cnn"].model.head) and not drafters["cnn"].native  # Python twin, not the fp32 runtime
    assert _is_qlinear(drafters["lstm"].model.head) and not drafters["lstm"].native
    assert type(drafters["lstm"].model.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert _is_qlinear(drafters["feature"].model.head)
    assert _is_qlinear(drafters["feature"].model.layer.mlp.down_proj)
    assert drafters["feature"].model._embed is tiny_llama.get_input_embeddings()  # shared, not copied
    assert _is_qlinear(drafters["hf"].model.lm_head)
    skip = drafters["layer_skip"].model
    assert _is_qlinear(skip.lm_head) and _is_qlinear(skip.model.layers[0].mlp.down_proj)
    assert len(skip.model.layers) == 1 and skip.model.embed_tokens is tiny_llama.model.embed_tokens


def test_int8_drafts_follow_the_float_drafts(tiny_llama, llama_inputs):
    """Quantization perturbs logits slightly: most greedy drafts stay the float drafter's."""
    ids, mask = llama_inputs[0][:4], llama_inputs[1][:4]
    target_out = _generate(tiny_llama, None, ids, mask).sequences
    drafter = LSTMDrafter.from_target(tiny_llama, dim=32, hidden_size=32)
    a = _generate(tiny_llama, drafter, ids, mask, gamma=4).metrics.acceptance_rate
    b = _generate(tiny_llama, quantize_drafter(drafter), ids, mask, gamma=4).metrics.acceptance_rate
    assert abs(a - b) <= 0.25, (a, b)
    assert target_out.shape[0] == 4


def test_int8_seq2seq_drafters_are_lossless(tiny_t5, t5_inputs):
    inputs = (t5_inputs[0][:3], t5_inputs[1][:3])
    _lossless(tiny_t5, quantize_drafter(LayerSkipDrafter(tiny_t5, 1)), inputs)
    _lossless(tiny_t5, quantize_drafter(HFDrafter(copy.deepcopy(tiny_t5))), inputs)
    _lossless(tiny_t5, quantize_drafter(CNNDrafter.from_target(tiny_t5, dim=32, num_layers=1)), inputs)


def test_int8_layer_skip_on_a_bf16_target_leaves_it_bf16(tiny_llama, llama_inputs):
    bf16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    drafter = quantize_drafter(LayerSkipDrafter(bf16, 1))
    _lossless(bf16, drafter, (llama_inputs[0][:3], llama_inputs[1][:3]))
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_weightless_drafters_are_returned_as_they_are():
    drafter = PromptLookupDrafter()
    assert quantize_drafter(drafter) is drafter


def test_load_drafter_int8(tiny_llama, llama_inputs, tmp_path):
    CNNDrafter.from_target(tiny_llama, dim=32, num_layers=2).save(str(tmp_path / "cnn"))
    drafter = load_drafter(str(tmp_path / "cnn"), tiny_llama, dtype="int8")
    assert _is_qlinear(drafter.model.head)
    _lossless(tiny_llama, drafter, (llama_inputs[0][:2], llama_inputs[1][:2]))
    with pytest.raises(UserError, match="accepted: .*for drafters: float32, bfloat16, float16, int8"):
        load_drafter(str(tmp_path / "cnn"), tiny_llama, dtype="int4")
