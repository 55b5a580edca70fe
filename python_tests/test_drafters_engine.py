"""Every drafter inside fastspec.generate: greedy output == the target's own HF greedy decoding,
token for token, on the FLAN-T5-architecture target and the causal Llama target (ragged batches
of 8); seeded sampling is reproducible; q matches the target's processing (α = 1 when the drafter
is the target itself); prompt lookup reaches α ≈ 1 on a target trained to copy its source; the
ensemble picks the oracle inside the engine."""
import pytest
import torch

import fastspec
from fastspec.distill.trainer import fit_neural_drafter
from fastspec.drafters import (
    CNNDrafter,
    EnsembleDrafter,
    HFDrafter,
    LayerSkipDrafter,
    LSTMDrafter,
    NgramDrafter,
    OracleDrafter,
    PromptLookupDrafter,
    RandomDrafter,
)

MAX_NEW = 16
KINDS = ["ngram", "prompt_lookup", "prompt_lookup_ngram", "cnn", "lstm", "hf", "layer_skip", "ensemble"]


def _hf_greedy(model, ids, mask, max_new=MAX_NEW):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=0)


def _outputs(model, ids, mask, seqs):
    """Generated tokens per row (as python lists) from HF-layout sequences."""
    start = 1 if model.config.is_encoder_decoder else ids.shape[1]
    return [row[start:].tolist() for row in seqs]


def _sources(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _small_hf_drafter(model):
    """A different, smaller model of the same family and vocabulary (the T5-small role)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(77)
    vocab = model.config.vocab_size
    if model.config.is_encoder_decoder:
        config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                          eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
        return T5ForConditionalGeneration(config).eval()
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def setups(tiny_t5, tiny_llama, t5_inputs, llama_inputs):
    """name -> (target, ids, mask, HF greedy sequences, trained cnn, trained lstm, fitted n-gram)."""
    result = {}
    for name, model, (ids, mask) in (("t5", tiny_t5, t5_inputs), ("llama", tiny_llama, llama_inputs)):
        ref = _hf_greedy(model, ids, mask)
        outputs = _outputs(model, ids, mask, ref)
        sources = _sources(ids, mask)
        start = 0 if model.config.is_encoder_decoder else None
        # The corpus drafters learn the first half of the rows' outputs: right on some rows,
        # wrong on others, so acceptance is ragged across the batch.
        ngram = NgramDrafter.create(3, model.config.vocab_size, smoothing=0.1, start_token_id=start).fit(outputs[:4])
        torch.manual_seed(0)
        cnn = CNNDrafter.from_target(model, dim=32, num_layers=2, kernel_size=3)
        fit_neural_drafter(cnn, sources[:4], outputs[:4], max_steps=25, batch_size=4, lr=3e-2)
        lstm = LSTMDrafter.from_target(model, dim=32, hidden_size=32)
        fit_neural_drafter(lstm, sources[:4], outputs[:4], max_steps=25, batch_size=4, lr=3e-2)
        result[name] = (model, ids, mask, ref, cnn, lstm, ngram)
    return result


def _make(kind, setup):
    model, _, _, _, cnn, lstm, ngram = setup
    if kind == "ngram":
        return ngram
    if kind == "prompt_lookup":
        return PromptLookupDrafter(max_n=3)
    if kind == "prompt_lookup_ngram":
        return PromptLookupDrafter(max_n=3, fallback=ngram)
    if kind == "cnn":
        return cnn
    if kind == "lstm":
        return lstm
    if kind == "hf":
        return HFDrafter(_small_hf_drafter(model))
    if kind == "layer_skip":
        return LayerSkipDrafter(model, 1)
    if kind == "ensemble":  # fixed relative costs: reproducible arm choices under a seed
        return EnsembleDrafter([ngram, lstm, LayerSkipDrafter(model, 1)], costs=[1.0, 1.2, 2.0])
    raise AssertionError(kind)


@pytest.mark.parametrize("target", ["t5", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_lossless_in_engine(kind, target, setups):
    model, ids, mask, ref = setups[target][:4]
    drafter = _make(kind, setups[target])
    # γ = 1 (one draft per step) for the stateful drafters, whose rollback it stresses most
    for gamma in ((1, 4) if kind in ("lstm", "hf", "layer_skip") else (4,)):
        out = fastspec.generate(model, drafter, ids, mask, gamma=gamma, max_new_tokens=MAX_NEW, pad_token_id=0)
        assert torch.equal(out.sequences, ref), (kind, target, gamma)
    if kind in ("ngram", "prompt_lookup_ngram", "cnn", "lstm"):
        # trained on half the rows: some drafts are accepted, not all
        assert 0.0 < out.metrics.acceptance_rate < 1.0, out.metrics.acceptance_rate


@pytest.mark.parametrize("target", ["t5", "llama"])
def test_drafter_that_is_the_target_gets_full_acceptance(target, setups):
    """HFDrafter(target) and LayerSkipDrafter(all layers) draft the target's own greedy tokens, and
    under sampling their q is processed exactly like p, so every draft is accepted."""
    model, ids, mask, ref = setups[target][:4]
    depth = len(model.decoder.block) if model.config.is_encoder_decoder else len(model.model.layers)
    for drafter in (HFDrafter(model), LayerSkipDrafter(model, depth)):
        out = fastspec.generate(model, drafter, ids, mask, gamma=4, max_new_tokens=MAX_NEW, pad_token_id=0)
        assert torch.equal(out.sequences, ref)
        assert out.metrics.acceptance_rate == 1.0
        out = fastspec.generate(model, drafter, ids[:3], mask[:3], gamma=4, max_new_tokens=MAX_NEW, pad_token_id=0,
                                do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=5)
        assert out.metrics.acceptance_rate > 0.97, out.metrics.acceptance_rate


@pytest.mark.parametrize("target", ["t5", "llama"])
@pytest.mark.parametrize("kind", ["ngram", "prompt_lookup_ngram", "cnn", "lstm", "hf", "ensemble"])
def test_sampling_in_engine_is_seeded(kind, target, setups):
    model, ids, mask = setups[target][:3]
    kwargs = dict(gamma=3, max_new_tokens=8, pad_token_id=0, do_sample=True, temperature=0.9, top_k=50)
    a = fastspec.generate(model, _make(kind, setups[target]), ids[:3], mask[:3], seed=3, **kwargs)
    b = fastspec.generate(model, _make(kind, setups[target]), ids[:3], mask[:3], seed=3, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert int(a.sequences.min()) >= 0 and int(a.sequences.max()) < model.config.vocab_size


# ---------------------------------------------------------------------------------------------
# prompt lookup on a target that copies its source
# ---------------------------------------------------------------------------------------------
COPY_LEN, COPY_VOCAB, SEP = 30, 48, 3


def _copy_batch(n, generator):
    """[BOS, SEP, x_1..x_K, SEP, x_1..x_K, EOS]: the answer quotes the source after the separator."""
    x = torch.randint(4, COPY_VOCAB, (n, COPY_LEN), generator=generator)
    ones = torch.ones(n, 1, dtype=torch.long)
    return torch.cat([ones, SEP * ones, x, SEP * ones, x, 2 * ones], 1)


@pytest.fixture(scope="module")
def copy_target():
    """A tiny Llama trained (100 steps, a few seconds) to copy its source verbatim."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=COPY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=80, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        seq = _copy_batch(32, generator)
        labels = seq.clone()
        labels[:, : COPY_LEN + 3] = -100  # loss on the copy only
        loss = model(input_ids=seq, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_prompt_lookup_alpha_near_one_on_a_copying_target(copy_target):
    seq = _copy_batch(4, torch.Generator().manual_seed(123))
    prompt = seq[:, : COPY_LEN + 3]
    ref = _hf_greedy(copy_target, prompt, torch.ones_like(prompt), max_new=COPY_LEN)
    assert torch.equal(ref[:, COPY_LEN + 3 :], seq[:, COPY_LEN + 3 : 2 * COPY_LEN + 3]), "the target did not learn to copy"
    out = fastspec.generate(copy_target, PromptLookupDrafter(max_n=3), prompt, gamma=4, max_new_tokens=COPY_LEN)
    assert torch.equal(out.sequences, ref)
    assert out.metrics.acceptance_rate >= 0.95, out.metrics.acceptance_rate
    # the baseline that does not search the source (a corpus n-gram of unrelated text) is far worse
    ngram = NgramDrafter.create(2, COPY_VOCAB).fit(_copy_batch(8, torch.Generator().manual_seed(9)).tolist())
    out_ngram = fastspec.generate(copy_target, ngram, prompt, gamma=4, max_new_tokens=COPY_LEN)
    assert torch.equal(out_ngram.sequences, ref)
    assert out_ngram.metrics.acceptance_rate < 0.5


def test_ensemble_picks_the_oracle_inside_the_engine(setups):
    model, ids, mask, ref = setups["llama"][:4]
    row_ids, row_mask = ids[:1], mask[:1]
    ref = _hf_greedy(model, row_ids, row_mask, max_new=60)
    oracle = OracleDrafter([ref[0, row_ids.shape[1]:].tolist()])
    # equal per-step costs: the choice depends on acceptance only, not on this machine's load
    ensemble = EnsembleDrafter(
        [RandomDrafter(seed=0, deterministic=True), oracle], names=["random", "oracle"], costs=[1.0, 1.0]
    )
    out = fastspec.generate(model, ensemble, row_ids, row_mask, gamma=2, max_new_tokens=60, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    stats = ensemble.stats()
    assert stats["oracle"]["pulls"] >= 0.7 * len(ensemble.history), stats
    assert stats["oracle"]["alpha"] > 0.9 and stats["random"]["alpha"] < 0.1
