"""load_target (local folder, seq2seq vs causal, dtype), offline tokenizer helpers, and the real
SmolLM2-135M (slow): greedy speculative == HF greedy on 3 aclsum prompts."""
import importlib.metadata
import json

import pytest
import torch

import fastspec
from fastspec.drafters import OracleDrafter, RandomDrafter
from fastspec.targets import load_t5_tokenizer, load_target


def test_t5_tokenizer_ids():
    assert load_t5_tokenizer()("summarize: Hello world")["input_ids"] == [21603, 10, 8774, 296, 1]


@pytest.mark.parametrize("which", ["tiny_t5", "tiny_llama"])
def test_load_target_local_folder(request, tmp_path, which):
    model = request.getfixturevalue(which)
    model.save_pretrained(tmp_path)
    loaded = load_target(str(tmp_path), dtype="float32")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config.is_encoder_decoder == model.config.is_encoder_decoder
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    half = load_target(tmp_path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_target(tmp_path, dtype="float7")


def _aclsum_prompts(tokenizer, n=3):
    folder = importlib.metadata.distribution("aclsum").locate_file("aclsum")
    with open(folder / "dataset" / "test.jsonl") as f:
        records = [json.loads(line) for line, _ in zip(f, range(n))]
    texts = []
    for record in records:
        abstract = " ".join(record["sentences"]["abstract"])
        messages = [{"role": "user", "content": f"Summarize this abstract in one sentence:\n{abstract}"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def test_smollm2_cache_is_float32_whoever_writes_it_first(tmp_path, monkeypatch):
    """The dequantized safetensors copy of the GGUF is float32 even when a bf16 load (the demo's
    dtype auto on an AMX CPU) writes it, so a later float32 load gets the full-precision weights."""
    from fastspec.targets import load_smollm2

    monkeypatch.setenv("FASTSPEC_CACHE", str(tmp_path))
    half, _ = load_smollm2(dtype="bfloat16")  # writes the cache
    assert next(half.parameters()).dtype == torch.bfloat16
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    full, _ = load_smollm2()  # reads it
    weight = full.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32
    assert not torch.equal(weight, weight.bfloat16().float())  # not bf16-rounded
    assert torch.equal(half.model.layers[0].mlp.down_proj.weight, weight.bfloat16())


@pytest.mark.slow
def test_smollm2_greedy_speculative_equals_hf():
    from fastspec.targets import load_smollm2

    model, tokenizer = load_smollm2()
    texts = _aclsum_prompts(tokenizer)
    max_new = 32
    refs = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        hf = model.generate(**enc, do_sample=False, max_new_tokens=max_new)
        refs.append(hf[0, enc["input_ids"].shape[1]:].tolist())
        if len(refs) > 1:
            continue
        # one row alone, random drafter (every step rejects: the AR-like path through the cache)
        ours = fastspec.generate(model, RandomDrafter(seed=0), enc["input_ids"], enc["attention_mask"], gamma=3,
                                 max_new_tokens=max_new)
        assert torch.equal(ours.sequences, hf)
    # the 3 prompts as one left-padded batch with a noisy oracle: ragged acceptance on a real model
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    eos = model.generation_config.eos_token_id
    conts = [r[: r.index(eos) + 1] if eos in r else r for r in refs]
    out = fastspec.generate(model, OracleDrafter(conts, noise=0.25), enc["input_ids"], enc["attention_mask"],
                            gamma=4, max_new_tokens=max_new)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    for row, ref in enumerate(conts):
        assert new[row, : len(ref)].tolist() == ref
    assert 0 < out.metrics.acceptance_rate < 1


def test_load_target_device_map_auto(tmp_path, tiny_t5, t5_inputs):
    """device_map="auto" (accelerate) loads a target the engine decodes exactly as the plain one."""
    pytest.importorskip("accelerate")
    tiny_t5.save_pretrained(tmp_path)
    sharded = load_target(str(tmp_path), device_map="auto")
    ids, mask = t5_inputs[0][:3], t5_inputs[1][:3]
    kwargs = dict(max_new_tokens=8, eos_token_id=1, pad_token_id=0)
    ours = fastspec.generate(sharded, RandomDrafter(seed=0), ids, mask, gamma=3, **kwargs)
    assert torch.equal(ours.sequences, tiny_t5.generate(input_ids=ids, attention_mask=mask, **kwargs))
    with pytest.raises(ValueError, match="device_map"):
        load_target(str(tmp_path), device="cpu", device_map="auto")


@pytest.mark.parametrize("which", ["tiny_t5", "tiny_llama"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_emits_no_future_warning(request, which, num_beams):
    """transformers 5.2x deprecates `past_key_values` for `cache` with a FutureWarning per call."""
    import warnings

    model = request.getfixturevalue(which)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastspec.generate(model, None, torch.tensor([[5, 6, 7, 1]]), num_beams=num_beams, max_new_tokens=3)
    assert [w for w in caught if issubclass(w.category, FutureWarning)] == []


def test_hf_drafter_emits_no_future_warning(tiny_llama):
    """The drafter's own forwards use the current cache argument too (the demo's output stays clean)."""
    import warnings

    from fastspec.drafters import HFDrafter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastspec.generate(tiny_llama, HFDrafter(tiny_llama), torch.tensor([[5, 6, 7, 8]]), gamma=2, max_new_tokens=4)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_crop_cache_has_no_absolute_length_fallback():
    """transformers 5 only: a crop the cache refuses is an error, never retried as a 4.x absolute length."""
    from fastspec.cache import crop_cache

    class Refusing:
        calls = []

        def get_seq_length(self):
            return 5

        def crop(self, k):
            self.calls.append(k)
            raise ValueError("refused")

    cache = Refusing()
    with pytest.raises(ValueError, match="refused"):
        crop_cache(cache, 3)
    assert cache.calls == [-2]


def test_metrics_are_one_raw_sum_object(tiny_t5, t5_inputs):
    """The engine fills fastspec.metrics.GenerationMetrics: decode-step forwards apart from the
    encoder call, drafter calls and time, and sums that merge with +."""
    from fastspec.metrics import GenerationMetrics

    ids, mask = t5_inputs[0][:3], t5_inputs[1][:3]
    out = fastspec.generate(tiny_t5, RandomDrafter(seed=0), ids, mask, gamma=3, max_new_tokens=6, eos_token_id=None)
    m = out.metrics
    assert isinstance(m, GenerationMetrics)
    assert m.verify_calls == m.num_steps and m.target_calls == m.verify_calls + 1  # + the encoder
    # every step drafts but the last: one token left to emit, nothing to draft
    assert m.draft_calls == m.num_steps - 1 and m.draft_time_s > 0 and 0 < m.verify_time_s <= m.target_time_s
    # γ = 3 capped at the tokens a row may still emit − 1 (6, 5, 4, 3, 2, 1 left)
    assert m.num_generated_tokens == 3 * 6 and m.num_draft_tokens == 3 * (3 + 3 + 3 + 2 + 1)
    both = m + m
    assert both.acceptance_rate == pytest.approx(m.acceptance_rate) and both.num_steps == 2 * m.num_steps
    assert both.as_dict()["mean_accepted_length"] == pytest.approx(m["mean_accepted_length"])
