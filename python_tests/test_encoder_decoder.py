"""Any HF encoder-decoder target (DESIGN §9): tiny random T5, BART, Marian and Whisper, batch 3
(ragged encoder inputs, or ragged Whisper decoder prompts), with the generation settings real
checkpoints ship (forced BOS/EOS, no_repeat_ngram_size=3, suppress / begin_suppress tokens,
bad_words_ids, min_length) honoured at every verified position:

* greedy: token for token equal to HF's own generate (HF's generic generate with
  ``decoder_input_ids`` for Whisper), with drafters that get tokens accepted AND drafters that
  propose exactly what the settings forbid;
* sampling: the joint law of the first two tokens equals HF's processed distribution (χ²), and the
  same test fails when the processors are applied at the first verified position only;
* beam search with the same settings equals HF.
"""
import math

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GenerationMixin,
    LogitsProcessorList,
    MarianConfig,
    MarianMTModel,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import fastspec
from conftest import _spread_init
from fastspec.drafters import OracleDrafter, PromptLookupDrafter, RandomDrafter
from fastspec.engine.processors import LogitsProcessors

V = 16
MAX_NEW = 12
BART_LIKE = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0)
WHISPER_PROMPT = [11, 12, 13, 14]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|> in this vocab


def _seeded(cls, config, seed):
    torch.manual_seed(seed)
    return _spread_init(cls(config), seed)


@pytest.fixture(scope="module")
def models():
    bart = _seeded(BartForConditionalGeneration, BartConfig(max_position_embeddings=64, **BART_LIKE), 1)
    bart.generation_config.forced_bos_token_id = 0  # what facebook/bart-large-cnn ships (forced EOS is default)
    marian = _seeded(MarianMTModel, MarianConfig(max_position_embeddings=64, pad_token_id=V - 1,
                                                decoder_start_token_id=V - 1, eos_token_id=0, forced_eos_token_id=0,
                                                **BART_LIKE), 2)
    whisper = _seeded(WhisperForConditionalGeneration, WhisperConfig(
        num_mel_bins=4, max_source_positions=8, max_target_positions=64, decoder_start_token_id=11, eos_token_id=10,
        pad_token_id=10, bos_token_id=10, begin_suppress_tokens=[3, 10], suppress_tokens=[1, 2], **BART_LIKE), 3)
    t5 = _seeded(T5ForConditionalGeneration, T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, dropout_rate=0.0, tie_word_embeddings=False), 4)
    return {"t5": t5, "bart": bart, "marian": marian, "whisper": whisper}


def _inputs(name, batch=3, seed=0):
    """Encoder inputs of ``batch`` rows: ragged token ids (right padding), or Whisper features."""
    gen = torch.Generator().manual_seed(seed)
    if name == "whisper":
        return {"input_features": torch.randn(batch, 4, 16, generator=gen)}
    ids = torch.randint(3, V - 2, (batch, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, 9 - 2 * row:] = 0
    return {"input_ids": ids * mask + (1 - mask) * (V - 1 if name == "marian" else 0), "attention_mask": mask}


SHIPPED = {  # the settings each family's checkpoints ship, plus the ones every test adds
    "t5": dict(forced_bos_token_id=5, forced_eos_token_id=1, suppress_tokens=[2], begin_suppress_tokens=[4]),
    "bart": dict(),  # forced_bos_token_id=0 and forced_eos_token_id=2 from the generation config
    "marian": dict(),  # forced_eos_token_id=0
    "whisper": dict(),  # suppress_tokens and begin_suppress_tokens
}
EXTRA = dict(no_repeat_ngram_size=3, bad_words_ids=[[7], [6, 8], [9, 9, 5]], min_length=5)


def _hf(model, name, inputs, **kwargs):
    if name == "whisper":
        prompt = torch.tensor([WHISPER_PROMPT] * inputs["input_features"].shape[0])
        return GenerationMixin.generate(model, **inputs, decoder_input_ids=prompt, **kwargs)
    return model.generate(**inputs, **kwargs)


def _ours(model, name, drafter, inputs, **kwargs):
    if name == "whisper":
        kwargs["decoder_input_ids"] = torch.tensor([WHISPER_PROMPT] * inputs["input_features"].shape[0])
    return fastspec.generate(model, drafter, **inputs, **kwargs)


@pytest.mark.parametrize("name", ["t5", "bart", "marian", "whisper"])
def test_greedy_equals_hf_with_shipped_settings(models, name):
    model = models[name]
    inputs = _inputs(name)
    settings = dict(max_new_tokens=MAX_NEW, do_sample=False, **SHIPPED[name], **EXTRA)
    hf = _hf(model, name, inputs, **settings)
    plain = _hf(model, name, inputs, max_new_tokens=MAX_NEW, do_sample=False, min_length=0)
    assert not torch.equal(hf, plain)  # the settings really change the output
    start = len(WHISPER_PROMPT) if name == "whisper" else 1
    processed = [row[start:].tolist() for row in hf]
    unprocessed = [row[start:].tolist() for row in plain]
    drafters = {
        "none": None,
        "oracle": OracleDrafter(processed, noise=0.3, noise_seed=1),  # ragged acceptance
        # drafts exactly what the settings forbid (repeated n-grams, bad words, early EOS): all rejected
        "unprocessed": OracleDrafter(unprocessed),
        "random": RandomDrafter(seed=0, deterministic=True),
    }
    if name != "whisper":
        drafters["prompt_lookup"] = PromptLookupDrafter(max_n=2)
    for kind, drafter in drafters.items():
        out = _ours(model, name, drafter, inputs, gamma=3, **settings)
        assert torch.equal(out.sequences, hf), kind
        if kind == "oracle":
            assert 0 < out.metrics.acceptance_rate < 1


def test_whisper_ragged_decoder_prompts(models):
    """Rows with decoder prompts of different lengths (left padded, with decoder_attention_mask)
    each equal HF's generate of that row alone."""
    model = models["whisper"]
    feats = _inputs("whisper")["input_features"]
    prompts = [WHISPER_PROMPT, WHISPER_PROMPT[:2], WHISPER_PROMPT[:3]]
    ids = torch.full((3, 4), 10)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 4 - len(prompt):] = torch.tensor(prompt)
        mask[row, 4 - len(prompt):] = 1
    settings = dict(max_new_tokens=MAX_NEW, **EXTRA)
    refs = [GenerationMixin.generate(model, input_features=feats[row:row + 1],
                                     decoder_input_ids=torch.tensor([prompt]), **settings)[0, len(prompt):].tolist()
            for row, prompt in enumerate(prompts)]
    for drafter in (None, OracleDrafter(refs, noise=0.3)):
        out = fastspec.generate(model, drafter, input_features=feats, decoder_input_ids=ids,
                                decoder_attention_mask=mask, gamma=3, **settings)
        assert torch.equal(out.sequences[:, :4], ids)
        for row, ref in enumerate(refs):
            new = out.sequences[row, 4:].tolist()
            assert new[: len(ref)] == ref and all(t == 10 for t in new[len(ref):]), row


@pytest.mark.parametrize("name", ["t5", "bart", "marian", "whisper"])
def test_beam_search_equals_hf_with_shipped_settings(models, name):
    model = models[name]
    inputs = _inputs(name)
    settings = dict(max_new_tokens=MAX_NEW, num_beams=3, num_return_sequences=2, **SHIPPED[name], **EXTRA)
    hf = _hf(model, name, inputs, **settings)
    assert torch.equal(_ours(model, name, None, inputs, **settings).sequences, hf)


# ------------------------------------------------------------------------------------------ sampling
NUM_SAMPLES = 6000
SAMPLE_SETTINGS = dict(suppress_tokens=[2], begin_suppress_tokens=[4, 5], bad_words_ids=[[7], [6, 8], [9, 3]],
                       no_repeat_ngram_size=2, temperature=1.5)


def _exact_joint(model, name, inputs):
    """P(first two new tokens = (a, b)) under HF's own processors: [V,V]."""
    prompt = torch.tensor([WHISPER_PROMPT if name == "whisper" else [model.config.decoder_start_token_id]])
    procs = LogitsProcessorList([
        NoRepeatNGramLogitsProcessor(2),
        NoBadWordsLogitsProcessor(SAMPLE_SETTINGS["bad_words_ids"], model.generation_config.eos_token_id),
        SuppressTokensLogitsProcessor(SAMPLE_SETTINGS["suppress_tokens"]),
        SuppressTokensAtBeginLogitsProcessor(SAMPLE_SETTINGS["begin_suppress_tokens"], prompt.shape[1]),
    ])
    one = {k: v[:1] for k, v in inputs.items()}
    many = {k: v[:1].repeat(V, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    with torch.no_grad():
        first = procs(prompt, model(**one, decoder_input_ids=prompt).logits[:, -1])
        seconds = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], dim=1)  # [V,P+1]
        second = procs(seconds, model(**many, decoder_input_ids=seconds).logits[:, -1])
    first, second = (first / 1.5).softmax(-1)[0], (second / 1.5).softmax(-1)
    return (first[:, None] * second).double().nan_to_num(0.0)


def _chi2(counts, expected):
    """Pearson χ² (cells of expected < 5 merged) and the p = 1e-4 critical value; sampling a
    forbidden cell counts as an infinite statistic."""
    counts, expected = counts.flatten().double(), expected.flatten().double()
    if float(counts[expected == 0].sum()) > 0:
        return math.inf, 0.0
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat, dof = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1
    return stat, dof * (1 - 2 / (9 * dof) + 3.72 * math.sqrt(2 / (9 * dof))) ** 3


def _sample_stat(model, name):
    one = _inputs(name, batch=1)
    many = {k: v.repeat(NUM_SAMPLES, *([1] * (v.dim() - 1))) for k, v in one.items()}
    out = _ours(model, name, RandomDrafter(seed=5), many, gamma=2, do_sample=True, top_k=0, max_new_tokens=2,
                eos_token_id=None, forced_eos_token_id=None, forced_bos_token_id=None, min_length=0, seed=7,
                **SAMPLE_SETTINGS)
    new = out.sequences[:, -2:]
    counts = torch.bincount(new[:, 0] * V + new[:, 1], minlength=V * V)
    assert 0 < out.metrics.acceptance_rate < 1
    return _chi2(counts, _exact_joint(model, name, one) * NUM_SAMPLES)


@pytest.mark.parametrize("name", ["t5", "bart", "marian", "whisper"])
def test_sampling_matches_hf_processed_distribution(models, name):
    stat, critical = _sample_stat(models[name], name)
    assert stat < critical, (stat, critical)


def test_processors_at_first_position_only_fail_the_same_test(models, monkeypatch):
    """Control: an engine that processes only the first verified position samples forbidden pairs."""
    original = LogitsProcessors.__call__

    def first_only(self, logits, tokens, lengths, num_generated):
        head = original(self, logits[:, :1], tokens, lengths, num_generated)
        return torch.cat([head, logits[:, 1:]], dim=1)

    monkeypatch.setattr(LogitsProcessors, "__call__", first_only)
    stat, critical = _sample_stat(models["bart"], "bart")
    assert stat > 3 * critical


def test_prompt_lookup_needs_a_token_source(models):
    with pytest.raises(ValueError, match="no token source"):
        _ours(models["whisper"], "whisper", PromptLookupDrafter(), _inputs("whisper"), max_new_tokens=4)


def test_any_encoder_tensor_passes_through(models):
    """Any tensor the encoder's forward names reaches the encoder (here T5's inputs_embeds: no token
    source), like HF; a tensor nobody takes is refused by name."""
    model = models["t5"]
    inputs = _inputs("t5")
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()  # [B,S,d]
    settings = dict(max_new_tokens=8, no_repeat_ngram_size=3)
    hf = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **settings)
    ours = fastspec.generate(model, RandomDrafter(seed=0), inputs_embeds=embeds,
                             attention_mask=inputs["attention_mask"], gamma=2, **settings)
    assert torch.equal(ours.sequences, hf)
    with pytest.raises(ValueError, match="not_an_input"):
        fastspec.generate(model, None, **inputs, not_an_input=torch.zeros(3, 2), max_new_tokens=2)


def test_decoder_sequences_start_with_the_decoder_prompt():
    """A seq2seq row's sequence is its decoder prompt (any padding side) + its generated tokens;
    without a decoder prompt, the start token (drafters see what the target's decoder reads)."""
    from fastspec.drafters.base import DraftRequest, DraftStep
    from fastspec.drafters.context import decoder_sequences

    prompt = torch.tensor([[0, 7, 8], [5, 0, 9]])  # row 1 left-padded: its prompt is [0, 9]
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    step = DraftStep(generated=torch.tensor([[4, 6], [3, -1]]), num_generated=torch.tensor([2, 1]),
                     active=torch.tensor([True, True]), gamma=2)
    request = DraftRequest(source_ids=torch.ones(2, 4, dtype=torch.long), source_mask=None, is_encoder_decoder=True,
                           vocab_size=12, decoder_start_token_id=0, decoder_prompt_ids=prompt, decoder_prompt_mask=mask)
    seq, lengths = decoder_sequences(request, step, extra=1)
    assert lengths.tolist() == [5, 3]
    assert seq.tolist() == [[0, 7, 8, 4, 6, -1], [0, 9, 3, -1, -1, -1]]
    plain = DraftRequest(source_ids=torch.ones(2, 4, dtype=torch.long), source_mask=None, is_encoder_decoder=True,
                         vocab_size=12, decoder_start_token_id=0)
    seq, lengths = decoder_sequences(plain, step)
    assert lengths.tolist() == [3, 2] and seq.tolist() == [[0, 4, 6], [0, 3, -1]]
