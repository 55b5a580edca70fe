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
