"""Bad input to fastspec.generate raises a clear ValueError; settings merge like HF generate()."""
import pytest
import torch
from transformers import GenerationConfig

import fastspec
from fastspec.drafters import OracleDrafter, RandomDrafter


@pytest.fixture(scope="module")
def llama_prompt():
    return torch.tensor([[5, 6, 7, 8]])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.tensor([[5, 3001]])), "outside"),
        (dict(input_ids=torch.tensor([[5, -3]])), "outside"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), "integer"),
        (dict(gamma=0), "gamma"),
        (dict(gamma=-2), "gamma"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-5), "max_new_tokens"),
        (dict(attention_mask=torch.ones(1, 3, dtype=torch.long)), "attention_mask shape"),
        (dict(attention_mask=torch.zeros(1, 4, dtype=torch.long)), "no real token"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(bad_words_ids=[[5, 3001]]), "bad_words_ids"),
        (dict(bad_words_ids=[5]), "bad_words_ids"),
        (dict(suppress_tokens=[-1]), "suppress_tokens"),
        (dict(sequence_bias={(5,): 1.0}), "sequence_bias"),
        (dict(encoder_no_repeat_ngram_size=2), "encoder_no_repeat_ngram_size"),
        (dict(decoder_input_ids=torch.tensor([[1]])), "encoder-decoder"),
        (dict(typical_p=0.5, do_sample=True), "typical_p"),
        (dict(num_beams=4), "drafter=None"),
        (dict(not_a_generation_option=1), "not_a_generation_option"),
        (dict(input_ids=torch.randint(3, 100, (1, 1100))), "max positions"),
        (dict(max_new_tokens=1500), "max positions"),
    ],
)
def test_bad_input_raises_value_error(tiny_llama, llama_prompt, kwargs, message):
    call = dict(input_ids=llama_prompt, max_new_tokens=4, gamma=3)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fastspec.generate(tiny_llama, RandomDrafter(seed=0), **call)


def test_drafter_vocab_mismatch(tiny_llama, tiny_t5, llama_prompt):
    with pytest.raises(ValueError, match="vocab"):
        fastspec.generate(tiny_llama, RandomDrafter(vocab_size=32128), llama_prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match="vocab"):
        fastspec.generate(tiny_t5, RandomDrafter(vocab_size=3001), torch.tensor([[21603, 10, 1]]), max_new_tokens=4)
    # None adapts; the right size is accepted
    fastspec.generate(tiny_llama, RandomDrafter(vocab_size=3001), llama_prompt, max_new_tokens=4)


def test_t5_ids_above_vocab(tiny_t5):
    with pytest.raises(ValueError, match="outside"):
        fastspec.generate(tiny_t5, None, torch.tensor([[21603, 32128, 1]]), max_new_tokens=4)


def test_bad_drafter_output_raises(tiny_llama, llama_prompt):
    class Broken(RandomDrafter):
        def draft(self, step):
            out = super().draft(step)
            out.tokens = torch.cat([out.tokens, out.tokens[:, :1]], dim=1)  # γ+1 tokens: more than asked
            return out

    with pytest.raises(ValueError, match="drafter returned"):
        fastspec.generate(tiny_llama, Broken(), llama_prompt, gamma=3, max_new_tokens=4)


def test_short_drafts_are_verified_losslessly(tiny_llama, llama_prompt):
    """A drafter may return k < γ tokens (k = 0 included): the engine verifies k+1 positions."""

    class Short(RandomDrafter):
        def draft(self, step):
            out = super().draft(step)
            self.calls = getattr(self, "calls", 0) + 1
            return type(out)(tokens=out.tokens[:, : self.calls % 3])  # widths 1, 2, 0, 1, ...

    ours = fastspec.generate(tiny_llama, Short(seed=0, deterministic=True), llama_prompt, gamma=3, max_new_tokens=12)
    hf = tiny_llama.generate(
        input_ids=llama_prompt, attention_mask=torch.ones_like(llama_prompt), do_sample=False, max_new_tokens=12
    )
    assert torch.equal(ours.sequences, hf)
    assert ours.metrics.num_steps >= 12 // 3


def test_generation_config_merge_like_hf(tiny_llama, llama_prompt):
    """kwargs > generation_config > model.generation_config > HF defaults (max_length 20)."""
    ours = fastspec.generate(tiny_llama, None, llama_prompt, pad_token_id=0)
    hf = tiny_llama.generate(input_ids=llama_prompt, attention_mask=torch.ones_like(llama_prompt), pad_token_id=0)
    assert torch.equal(ours.sequences, hf)  # default: 20 new tokens
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = fastspec.generate(tiny_llama, None, llama_prompt, generation_config=config)
    assert ours.sequences.shape[1] == 4 + 6
    ours = fastspec.generate(tiny_llama, None, llama_prompt, generation_config=config, max_new_tokens=3)
    assert ours.sequences.shape[1] == 4 + 3


def test_seq2seq_default_max_length(tiny_t5):
    ids = torch.tensor([[21603, 10, 8774, 296, 1]])
    ours = fastspec.generate(tiny_t5, None, ids)
    hf = tiny_t5.generate(input_ids=ids)
    assert torch.equal(ours.sequences, hf)


def test_oracle_drafter_row_count_checked(tiny_llama, llama_prompt):
    with pytest.raises(ValueError, match="continuations"):
        fastspec.generate(tiny_llama, OracleDrafter([[1], [2]]), llama_prompt, max_new_tokens=4)


def test_bad_input_never_crashes_on_1d_input(tiny_llama):
    out = fastspec.generate(tiny_llama, None, torch.tensor([5, 6, 7]), max_new_tokens=3, pad_token_id=0)
    assert out.sequences.shape == (1, 6)
