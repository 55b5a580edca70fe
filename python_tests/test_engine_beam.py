"""num_beams > 1: the engine's autoregressive beam search equals HF generate(num_beams=...) token
for token (length_penalty, early_stopping True/False/"never", num_return_sequences ≤ num_beams,
EOS, repetition penalty, min_new_tokens)."""
import pytest
import torch

import fastspec

CASES = [  # num_beams, length_penalty, early_stopping, num_return_sequences
    (2, 1.0, False, 1),
    (3, 0.5, True, 2),
    (4, 2.0, "never", 4),
    (5, -1.0, False, 1),
]


def _frequent_token(model, ids, mask):
    """A token the model really emits (so EOS ends some beams mid-search)."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    new = out[:, 1:] if model.config.is_encoder_decoder else out[:, ids.shape[1]:]
    values, counts = new[:, 2:].flatten().unique(return_counts=True)
    return int(values[counts.argmax()])


def _compare(model, ids, mask, **kw):
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
    ours = fastspec.generate(model, None, ids, mask, pad_token_id=0, **kw)
    assert ours.sequences.shape == hf.shape
    assert torch.equal(ours.sequences, hf)
    return ours


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,nrs", CASES)
@pytest.mark.parametrize("name", ["t5", "llama", "tiny_vocab"])
def test_beam_search_equals_hf(request, name, num_beams, length_penalty, early_stopping, nrs):
    if name == "t5":
        model = request.getfixturevalue("tiny_t5")
        ids, mask = request.getfixturevalue("t5_inputs")  # right padding
        ids, mask = ids[:4], mask[:4]
    elif name == "llama":
        model = request.getfixturevalue("tiny_llama")
        ids, mask = request.getfixturevalue("llama_inputs")  # left padding
        ids, mask = ids[:4], mask[:4]
    else:
        model = request.getfixturevalue("tiny_vocab_llama")
        ids = torch.randint(3, 12, (3, 5), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
    eos = _frequent_token(model, ids, mask)
    out = _compare(model, ids, mask, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, num_return_sequences=nrs, max_new_tokens=10, eos_token_id=eos)
    assert out.sequences.shape[0] == ids.shape[0] * nrs
    assert out.metrics.target_calls >= 2


def test_beam_search_with_penalty_and_min_new_tokens(tiny_vocab_llama):
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    eos = _frequent_token(tiny_vocab_llama, ids, mask)
    _compare(tiny_vocab_llama, ids, mask, num_beams=3, repetition_penalty=1.5, min_new_tokens=4, max_new_tokens=9,
             eos_token_id=eos, num_return_sequences=2)


def test_beam_search_bad_settings(tiny_vocab_llama):
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="num_return_sequences"):
        fastspec.generate(tiny_vocab_llama, None, ids, num_beams=2, num_return_sequences=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="drafter=None"):
        fastspec.generate(tiny_vocab_llama, fastspec.drafters.RandomDrafter(), ids, num_beams=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="beam sampling"):
        fastspec.generate(tiny_vocab_llama, None, ids, num_beams=2, do_sample=True, max_new_tokens=4)


# ------------------------------------------------------------------- defects fixed by the engine split
@pytest.mark.parametrize("start", ["list", "missing"])
def test_beam_search_list_or_missing_decoder_start(tiny_t5, t5_inputs, start):
    """A list-valued decoder_start_token_id (HF: one per row) or none at all (HF falls back to
    bos_token_id) works in beam search and in the loop, like HF."""
    ids, mask = t5_inputs[0][:3], t5_inputs[1][:3]
    kwargs = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=1)
    reference = tiny_t5.generate(input_ids=ids, attention_mask=mask, num_beams=2, **kwargs)
    configs = (tiny_t5.config, tiny_t5.generation_config)
    names = ("decoder_start_token_id", "bos_token_id")
    saved = [(c, n, getattr(c, n, None)) for c in configs for n in names]
    try:
        if start == "list":
            call = dict(decoder_start_token_id=[0, 0, 0])
        else:
            tiny_t5.config.decoder_start_token_id = tiny_t5.generation_config.decoder_start_token_id = None
            tiny_t5.config.bos_token_id = tiny_t5.generation_config.bos_token_id = 0
            call = {}
        beams = fastspec.generate(tiny_t5, None, ids, mask, num_beams=2, **kwargs, **call)
        greedy = fastspec.generate(tiny_t5, None, ids, mask, **kwargs, **call)
    finally:
        for config, name, value in saved:
            setattr(config, name, value)
    assert torch.equal(beams.sequences, reference)
    assert torch.equal(greedy.sequences, tiny_t5.generate(input_ids=ids, attention_mask=mask, **kwargs))


def test_beam_search_without_position_ids(tiny_vocab_llama):
    """A causal model whose forward takes no position_ids: beam search must not pass them."""
    from transformers import LlamaForCausalLM

    class NoPositions(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep)

    model = NoPositions(tiny_vocab_llama.config).eval()
    model.load_state_dict(tiny_vocab_llama.state_dict())
    ids = torch.randint(3, 12, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_beams=3, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    hf = tiny_vocab_llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    assert torch.equal(fastspec.generate(model, None, ids, **kwargs).sequences, hf)
    with pytest.raises(ValueError, match="position_ids"):  # padding needs positions: refused, not wrong
        fastspec.generate(model, None, ids, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), num_beams=2,
                          max_new_tokens=3)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_timing_syncs_only_when_asked(tiny_vocab_llama, monkeypatch, num_beams):
    """Per-forward timing synchronises the device around every target forward (beam search too)
    with sync_timing=True, and never without it."""
    from fastspec.engine import session

    syncs = []
    monkeypatch.setattr(session.torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    real_init = session.Stopwatch.__init__

    def cuda_like(self, device, sync):  # CPU machine: pretend the device is a GPU
        real_init(self, device, sync)
        self.sync = bool(sync)

    monkeypatch.setattr(session.Stopwatch, "__init__", cuda_like)
    ids = torch.tensor([[3, 4, 5]])
    out = fastspec.generate(tiny_vocab_llama, None, ids, num_beams=num_beams, max_new_tokens=4, eos_token_id=None)
    assert syncs == []
    out = fastspec.generate(tiny_vocab_llama, None, ids, num_beams=num_beams, max_new_tokens=4, eos_token_id=None,
                            sync_timing=True)
    assert len(syncs) >= 2 * out.metrics.target_calls
