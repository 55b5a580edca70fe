"""Drafters without the engine: the C++ drafter runtime against its Python twins (exact tokens),
valid ids, seeded determinism, save/load round trips, corrupted files, LSTM/HF cache rollback,
causality of the neural drafters, and the ensemble bandit."""
import json
import os
import random

import pytest
import torch

from fastspec import ops
from fastspec.distill.pseudo import PseudoDatasetError, load_pseudo_dataset
from fastspec.distill.trainer import fit_neural_drafter, fit_ngram_drafter
from fastspec.drafters import (
    CNNDrafter,
    CommitInfo,
    DraftRequest,
    DraftStep,
    EnsembleDrafter,
    HFDrafter,
    LayerSkipDrafter,
    LSTMDrafter,
    NgramDrafter,
    PromptLookupDrafter,
    SamplingParams,
    load_drafter,
)
from fastspec.drafters.base import DraftOutput, Drafter
from fastspec.drafters.cnn import CausalConvLM, cnn_draft_native, cnn_draft_reference
from fastspec.drafters.lstm import LSTMLM, lstm_draft_native, lstm_draft_reference
from fastspec.drafters.prompt_lookup import prompt_lookup_reference
from fastspec.errors import UserError

needs_native = pytest.mark.skipif(not ops.native_available(), reason="fastspec._C not built")
V = 111


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _request(source, mask=None, *, seq2seq=True, vocab=V, sampling=None, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DraftRequest(
        source_ids=source, source_mask=torch.ones_like(source) if mask is None else mask, is_encoder_decoder=seq2seq,
        vocab_size=vocab, decoder_start_token_id=0 if seq2seq else None, pad_token_id=0,
        sampling=sampling or SamplingParams(), generator=gen,
    )


def _step(rows, gamma):
    """DraftStep from python lists of generated tokens (ragged, right-padded with -1)."""
    width = max([len(r) for r in rows] + [0])
    gen = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        gen[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    num = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return DraftStep(generated=gen, num_generated=num, active=torch.ones(len(rows), dtype=torch.bool), gamma=gamma)


def _tiny_llama(vocab, seed, layers=2, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 if "embed" in name else 2.0 / p.shape[-1] ** 0.5)
    return model


def _tiny_t5(vocab, seed, layers=1, d_model=32):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                      eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 if "shared" in name or "relative" in name else 2.0 / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def llama111():
    return _tiny_llama(V, seed=3)


@pytest.fixture(scope="module")
def t5_111():
    return _tiny_t5(V, seed=4)


def _ngram(vocab=V, n=3):
    gen = torch.Generator().manual_seed(0)
    drafter = NgramDrafter.create(n, vocab, smoothing=0.5, start_token_id=0)
    return drafter.fit([torch.randint(3, vocab, (30,), generator=gen).tolist() for _ in range(20)])


def _cnn(vocab=V, seed=0):
    torch.manual_seed(seed)
    return CNNDrafter(CausalConvLM(vocab, embed_dim=24, dim=16, num_layers=2, kernel_size=3), start_token_id=0)


def _lstm(vocab=V, seed=0):
    torch.manual_seed(seed)
    return LSTMDrafter(LSTMLM(vocab, embed_dim=24, dim=16, hidden_size=20, num_layers=2), start_token_id=0)


DRAFTER_KINDS = ["ngram", "prompt_lookup", "prompt_lookup_ngram", "cnn", "lstm", "hf_t5", "hf_llama", "layer_skip",
                 "ensemble"]


def _make(kind, llama111, t5_111):
    """(drafter, is seq2seq)"""
    if kind == "ngram":
        return _ngram(), True
    if kind == "prompt_lookup":
        return PromptLookupDrafter(max_n=3), True
    if kind == "prompt_lookup_ngram":
        return PromptLookupDrafter(max_n=3, fallback=_ngram()), True
    if kind == "cnn":
        return _cnn(), True
    if kind == "lstm":
        return _lstm(), True
    if kind == "hf_t5":
        return HFDrafter(t5_111), True
    if kind == "hf_llama":
        return HFDrafter(llama111), False
    if kind == "layer_skip":
        return LayerSkipDrafter(llama111, 1), False
    if kind == "ensemble":
        return EnsembleDrafter([_ngram(), _cnn(), PromptLookupDrafter(max_n=2)], cost_aware=False), True
    raise AssertionError(kind)


def _source(batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 40, (batch, 12), generator=gen)  # small id range: prompt lookup finds matches
    mask = torch.ones_like(src)
    mask[1 % batch, 9:] = 0  # right padding
    return src, mask


def _run(drafter, seq2seq, *, sampling=None, seed=None, gamma=4, rounds=3):
    """begin, then `rounds` draft/commit cycles accepting 1 draft per row; returns the drafts."""
    src, mask = _source()
    drafter.begin(_request(src, mask, seq2seq=seq2seq, sampling=sampling, seed=seed))
    rows = [[5], [], [7, 8, 9]]
    outs = []
    for _ in range(rounds):
        out = drafter.draft(_step(rows, gamma))
        outs.append(out)
        k = min(1, out.tokens.shape[1])  # drafters may return fewer than γ tokens (even none)
        accepted = torch.full((3,), k, dtype=torch.long)
        committed = torch.full((3, out.tokens.shape[1] + 1), -1, dtype=torch.long)
        committed[:, :k] = out.tokens[:, :k]
        committed[:, k] = 4
        drafter.commit(CommitInfo(output_tokens=committed, num_accepted=accepted, active=torch.ones(3, dtype=torch.bool)))
        rows = [r + committed[b, : k + 1].tolist() for b, r in enumerate(rows)]
    drafter.end()
    return outs


# ---------------------------------------------------------------------------------------------
# prompt lookup: native matcher == Python twin
# ---------------------------------------------------------------------------------------------
@needs_native
def test_prompt_lookup_native_equals_reference_random():
    rng = random.Random(0)
    for case in range(300):
        batch = rng.choice([1, 3, 8])
        vocab = rng.choice([3, 5, 20])
        gamma = rng.randint(1, 8)
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        prefix = rng.random() < 0.5
        src_rows = [[rng.randrange(vocab) for _ in range(rng.randint(0, 15))] for _ in range(batch)]
        gen_rows = [[rng.randrange(vocab) for _ in range(rng.randint(0, 10))] for _ in range(batch)]
        S = max([len(r) for r in src_rows] + [1])
        G = max([len(r) for r in gen_rows] + [1])
        src = torch.full((batch, S), -1, dtype=torch.long)
        gen = torch.full((batch, G), -1, dtype=torch.long)
        for b in range(batch):
            src[b, : len(src_rows[b])] = torch.tensor(src_rows[b], dtype=torch.long)
            gen[b, : len(gen_rows[b])] = torch.tensor(gen_rows[b], dtype=torch.long)
        slen = torch.tensor([len(r) for r in src_rows])
        glen = torch.tensor([len(r) for r in gen_rows])
        tok, num = torch.ops.fastspec.prompt_lookup_draft(src, slen, gen, glen, gamma, max_n, min_n, prefix)
        ref_tok, ref_num = prompt_lookup_reference(src_rows, gen_rows, gamma, max_n, min_n, prefix)
        assert torch.equal(tok, ref_tok), case
        assert torch.equal(num, ref_num), case


def test_prompt_lookup_copies_the_encoder_input_for_seq2seq():
    src = torch.tensor([[50, 51, 52, 53, 54, 55, 56]])
    for native in (True, False):
        d = PromptLookupDrafter(max_n=3, use_native=native)
        d.begin(_request(src, vocab=100))
        out = d.draft(_step([[9, 51, 52]], 4))
        assert out.tokens.tolist() == [[53, 54, 55, 56]]
        assert out.probs is None and d.deterministic
        # no match at all: an empty draft, so the engine verifies a single position
        out = d.draft(_step([[9]], 3))
        assert tuple(out.tokens.shape) == (1, 0)
        # a partial match drafts only as far as it goes
        out = d.draft(_step([[9, 54, 55]], 4))
        assert out.tokens.tolist() == [[56]]


def test_prompt_lookup_fallback_fills_the_rest():
    src = torch.tensor([[50, 51, 52]])
    fallback = NgramDrafter.create(2, 100, smoothing=0.0).fit([[52, 60, 61, 62, 63]])
    d = PromptLookupDrafter(max_n=2, fallback=fallback)
    d.begin(_request(src, vocab=100))
    out = d.draft(_step([[51]], 4))  # 52 from the source, then the n-gram continues after 52
    assert out.tokens.tolist() == [[52, 60, 61, 62]]


@needs_native
def test_prompt_lookup_bad_arguments():
    src = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="longer than its tensor"):
        torch.ops.fastspec.prompt_lookup_draft(src, torch.tensor([4]), src, torch.tensor([1]), 2, 2, 1, False)
    with pytest.raises(RuntimeError, match="min_n"):
        torch.ops.fastspec.prompt_lookup_draft(src, torch.tensor([3]), src, torch.tensor([1]), 2, 1, 2, False)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.fastspec.prompt_lookup_draft(src.int(), torch.tensor([3]), src, torch.tensor([1]), 2, 2, 1, False)
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_n=1, min_n=2)


# ---------------------------------------------------------------------------------------------
# CNN / LSTM: native runtime == Python twin
# ---------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("vocab", [111, 32128, 49152])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cnn_native_equals_reference(vocab, batch):
    torch.manual_seed(vocab + batch)
    model = CausalConvLM(vocab, embed_dim=12, dim=8 if vocab > 1000 else 16, num_layers=2, kernel_size=3).eval()
    R = model.receptive_field
    window = torch.randint(0, vocab, (batch, R))
    window[0, : R - 1] = -1  # a row with only one real token
    if batch > 2:
        window[2, :2] = -1
    bias = torch.randn(batch, model.dim)
    with torch.no_grad():
        tok, logits = cnn_draft_native(model, window, bias, 6)
        ref_tok, ref_logits = cnn_draft_reference(model, window, bias, 6)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert tok.shape == (batch, 6) and int(tok.min()) >= 0 and int(tok.max()) < vocab


@needs_native
@pytest.mark.parametrize("vocab", [111, 32128, 49152])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_lstm_native_equals_reference(vocab, batch):
    torch.manual_seed(vocab * 7 + batch)
    model = LSTMLM(vocab, embed_dim=12, dim=8, hidden_size=10, num_layers=2).eval()
    last = torch.randint(0, vocab, (batch,))
    h, c = torch.randn(2, batch, 10), torch.randn(2, batch, 10)
    with torch.no_grad():
        native = lstm_draft_native(model, last, h, c, 5)
        ref = lstm_draft_reference(model, last, h, c, 5)
    assert torch.equal(native[0], ref[0])
    for a, b in zip(native[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert native[2].shape == (6, 2, batch, 10)


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
def test_sampled_native_equals_reference(batch):
    """Sampling inside the native loop: q via fastspec::process_logits and at::multinomial with the
    caller's generator give the Python twin's tokens for the same seed (and allclose q)."""
    sampling = SamplingParams(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, repetition_penalty=1.3)
    torch.manual_seed(batch)
    cnn = CausalConvLM(V, embed_dim=12, dim=16, num_layers=2, kernel_size=3).eval()
    lstm = LSTMLM(V, embed_dim=12, dim=8, hidden_size=10, num_layers=2).eval()
    window = torch.randint(0, V, (batch, cnn.receptive_field))
    window[0, :2] = -1
    bias = torch.randn(batch, 16)
    last = torch.randint(0, V, (batch,))
    h, c = torch.randn(2, batch, 10), torch.randn(2, batch, 10)
    prev = torch.randint(-1, V, (batch, 7))
    for seed in range(5):
        with torch.no_grad():
            runs = [
                (cnn_draft_native(cnn, window, bias, 5, sampling, prev, torch.Generator().manual_seed(seed)),
                 cnn_draft_reference(cnn, window, bias, 5, sampling, prev, torch.Generator().manual_seed(seed))),
                (lstm_draft_native(lstm, last, h, c, 5, sampling, prev, torch.Generator().manual_seed(seed)),
                 lstm_draft_reference(lstm, last, h, c, 5, sampling, prev, torch.Generator().manual_seed(seed))),
            ]
        for native, ref in runs:
            assert torch.equal(native[0], ref[0]), seed
            torch.testing.assert_close(native[1], ref[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(native[1].sum(-1), torch.ones(batch, 5))
            assert int((native[1] > 0).sum(-1).max()) <= 30  # top-k applied to q


@needs_native
def test_neural_runtime_bad_inputs_raise():
    model = LSTMLM(V, embed_dim=12, dim=8, hidden_size=10, num_layers=1)
    h = torch.zeros(1, 2, 10)
    with pytest.raises(RuntimeError, match="token ids"):
        lstm_draft_native(model, torch.tensor([0, V]), h, h, 2)
    with pytest.raises(RuntimeError, match=r"\[L,B,H\]"):
        lstm_draft_native(model, torch.tensor([0, 1, 2]), h, h, 2)
    with pytest.raises(RuntimeError, match="gamma"):
        lstm_draft_native(model, torch.tensor([0, 1]), h, h, 0)
    cnn = CausalConvLM(V, embed_dim=12, dim=8, num_layers=1, kernel_size=2)
    with pytest.raises(RuntimeError, match="vocab"):
        cnn_draft_native(cnn, torch.tensor([[0, V]]), torch.zeros(1, 8), 2)
    with pytest.raises(RuntimeError, match="int64"):
        cnn_draft_native(cnn, torch.tensor([[0, 1]], dtype=torch.int32), torch.zeros(1, 8), 2)


def test_neural_drafters_are_causal():
    """Changing token t never changes the logits at positions < t (no leak of the answer)."""
    source = torch.randint(0, V, (2, 7))
    for model in (_cnn().model, _lstm().model):
        ids = torch.randint(0, V, (2, 10))
        changed = ids.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % V
        with torch.no_grad():
            a, b = model(ids, source), model(changed, source)
        torch.testing.assert_close(a[:, :6], b[:, :6])
        assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_neural_drafter_native_and_python_paths_agree_in_protocol():
    for make in (_cnn, _lstm):
        outs = []
        for native in (True, False):
            d = make()
            d.use_native = native
            outs.append(torch.cat([o.tokens for o in _run(d, True)], 1))
        assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# LSTM and HF drafters: cache/state rollback == drafting from scratch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "hf_t5", "hf_llama", "layer_skip"])
def test_stateful_rollback_equals_fresh_drafter(kind, llama111, t5_111):
    """After ragged commits (0..γ accepted per row), the stateful drafter drafts exactly what a
    fresh drafter drafts from the committed tokens alone."""
    seq2seq = kind in ("lstm", "hf_t5")
    gamma = 4
    src, mask = _source()
    stateful = _make(kind, llama111, t5_111)[0]
    stateful.begin(_request(src, mask, seq2seq=seq2seq))
    rows = [[5], [], [7, 8, 9]]
    rng = random.Random(1)
    for round_ in range(5):
        out = stateful.draft(_step(rows, gamma))
        fresh = _make(kind, llama111, t5_111)[0]
        fresh.begin(_request(src, mask, seq2seq=seq2seq))
        assert torch.equal(out.tokens, fresh.draft(_step(rows, gamma)).tokens), round_
        accepted = torch.tensor([rng.randint(0, gamma) for _ in rows])
        committed = torch.full((3, gamma + 1), -1, dtype=torch.long)
        for b in range(3):
            a = int(accepted[b])
            committed[b, :a] = out.tokens[b, :a]
            committed[b, a] = (int(out.tokens[b, a]) + 1) % V if a < gamma else 3
            rows[b] = rows[b] + committed[b, : a + 1].tolist()
        stateful.commit(CommitInfo(output_tokens=committed, num_accepted=accepted, active=torch.ones(3, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------
# every drafter: valid ids, seeded determinism, save/load, corrupted files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_drafts_are_valid_target_ids(kind, llama111, t5_111):
    drafter, seq2seq = _make(kind, llama111, t5_111)
    for out in _run(drafter, seq2seq, gamma=5):
        # prompt lookup without a fallback may stop early (k < γ); everyone else drafts γ
        assert out.tokens.dim() == 2 and out.tokens.shape[0] == 3 and out.tokens.dtype == torch.long
        assert out.tokens.shape[1] == 5 or (kind in ("prompt_lookup", "ensemble") and out.tokens.shape[1] < 5)
        if out.tokens.numel():
            assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < V


SAMPLING = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)


@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_sampled_drafts_are_seeded_and_q_is_a_distribution(kind, llama111, t5_111):
    a = _run(_make(kind, llama111, t5_111)[0], _make(kind, llama111, t5_111)[1], sampling=SAMPLING, seed=11)
    b = _run(_make(kind, llama111, t5_111)[0], _make(kind, llama111, t5_111)[1], sampling=SAMPLING, seed=11)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens)
        if x.probs is not None:
            torch.testing.assert_close(x.probs, y.probs)
            assert x.probs.shape == (3, 4, V)
            torch.testing.assert_close(x.probs.sum(-1), torch.ones(3, 4), rtol=1e-4, atol=1e-4)
            # every drafted token has q > 0 under the target's top-k/top-p processing
            assert bool((x.probs.gather(2, x.tokens[:, :, None]) > 0).all())
            if kind not in ("ngram", "prompt_lookup_ngram", "ensemble"):  # n-gram q has ties (HF keeps them)
                assert int((x.probs > 0).sum(-1).max()) <= 20  # top_k=20 applied to q
    if kind in ("cnn", "lstm", "hf_t5", "hf_llama", "layer_skip", "ngram"):
        assert any(x.probs is not None for x in a)


@pytest.mark.parametrize("kind", [k for k in DRAFTER_KINDS if k not in ("hf_t5", "hf_llama")] + ["hf_llama"])
def test_save_load_round_trip_gives_identical_drafts(kind, llama111, t5_111, tmp_path):
    drafter, seq2seq = _make(kind, llama111, t5_111)
    drafter.save(str(tmp_path / "d"))
    kwargs = {"target": llama111} if kind in ("layer_skip",) else {}
    loaded = load_drafter(str(tmp_path / "d"), **kwargs)
    assert type(loaded) is type(drafter)
    a = _run(drafter, seq2seq)
    b = _run(loaded, seq2seq)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens)
    assert not any(name.endswith((".pt", ".pkl", ".bin")) and name != "ngram.bin" for name in os.listdir(tmp_path / "d"))


def _corrupt_files(folder):
    """Yield (description, mutate) pairs: each mutate damages one file of a saved drafter."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)

    def truncate(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])

    def flip(path):
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x5A
        open(path, "wb").write(bytes(data))

    for path in files:
        yield f"truncate {os.path.relpath(path, folder)}", path, truncate
        yield f"flip {os.path.relpath(path, folder)}", path, flip


@pytest.mark.parametrize("kind", ["ngram", "prompt_lookup_ngram", "cnn", "lstm", "hf_llama", "ensemble"])
def test_corrupted_files_raise_clear_errors(kind, llama111, t5_111, tmp_path):
    import shutil

    drafter, _ = _make(kind, llama111, t5_111)
    clean = tmp_path / "clean"
    drafter.save(str(clean))
    for description, path, mutate in _corrupt_files(str(clean)):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(clean, work)
        mutate(str(work / os.path.relpath(path, clean)))
        with pytest.raises(UserError):  # the CLI shows it as one line, no traceback
            load_drafter(str(work))
            pytest.fail(f"{kind}: {description} loaded without error")
    with pytest.raises(UserError, match="no such drafter folder"):
        load_drafter(str(tmp_path / "nothing_here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        load_drafter(str(tmp_path / "empty"))
    # a valid folder of another kind is refused by the class loader (an ensemble's members are
    # loaded by load_drafter, so the ensemble has no class loader of its own)
    other = tmp_path / "other"
    PromptLookupDrafter().save(str(other))
    if kind not in ("prompt_lookup_ngram", "ensemble"):
        with pytest.raises(ValueError, match="not a"):
            type(drafter).load(str(other))


def test_layer_skip_view_shares_weights_and_full_depth_equals_target(llama111, t5_111):
    for target, seq2seq in ((llama111, False), (t5_111, True)):
        before = sum(p.numel() for p in target.parameters())
        full = LayerSkipDrafter(target, len(target.model.layers) if not seq2seq else len(target.decoder.block))
        shallow = LayerSkipDrafter(target, 1)
        assert sum(p.numel() for p in target.parameters()) == before  # target untouched
        assert shallow.model.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
        # the full-depth view drafts the target's own greedy continuation
        src, _ = _source(batch=1)
        mask = torch.ones_like(src)
        full.begin(_request(src, mask, seq2seq=seq2seq))
        draft = full.draft(_step([[]], 6)).tokens
        hf = target.generate(input_ids=src, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0,
                             eos_token_id=None)
        expected = hf[:, 1:] if seq2seq else hf[:, src.shape[1]:]
        assert torch.equal(draft, expected)
    with pytest.raises(ValueError, match="num_layers"):
        LayerSkipDrafter(llama111, 99)


def test_wrong_vocabulary_is_refused(llama111):
    src, mask = _source()
    for drafter in (_ngram(vocab=50), _cnn(vocab=50), HFDrafter(llama111)):
        with pytest.raises(ValueError, match="vocab"):
            drafter.begin(_request(src, mask, seq2seq=False, vocab=V + 1))
    with pytest.raises(ValueError, match="causal HF drafter cannot draft for a seq2seq"):
        HFDrafter(llama111).begin(_request(src, mask, seq2seq=True))


# ---------------------------------------------------------------------------------------------
# training (shifted labels) and the ensemble bandit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_cnn, _lstm])
def test_training_on_shifted_labels_learns_to_draft(make):
    """Outputs count upward from a source-dependent start: after training the drafter continues."""
    gen = torch.Generator().manual_seed(0)
    sources, outputs = [], []
    for _ in range(64):
        start = int(torch.randint(3, 60, (1,), generator=gen))
        sources.append([start, start + 1])
        outputs.append(list(range(start, start + 12)))
    drafter = make()
    result = fit_neural_drafter(drafter, sources, outputs, max_steps=150, batch_size=16, lr=3e-2)
    assert result.final_loss < 0.5
    drafter.begin(_request(torch.tensor([[20, 21]]), seq2seq=True))
    out = drafter.draft(_step([[20, 21, 22]], 5))
    assert out.tokens.tolist() == [[23, 24, 25, 26, 27]]


class _Fixed(Drafter):
    """Test arm: always right (oracle) or always wrong."""

    def __init__(self, right):
        self.right = right
        self.vocab_size = V

    def draft(self, step):
        return DraftOutput(tokens=torch.zeros(step.num_generated.shape[0], step.gamma, dtype=torch.long))


@pytest.mark.parametrize("cost_aware", [True, False])
def test_ensemble_converges_to_the_oracle(cost_aware):
    ensemble = EnsembleDrafter([_Fixed(False), _Fixed(True)], cost_aware=cost_aware, names=["random", "oracle"])
    src, mask = _source(batch=2)
    ensemble.begin(_request(src, mask))
    gamma = 4
    for _ in range(200):
        ensemble.draft(_step([[1], [2]], gamma))
        arm = ensemble.history[-1]
        accepted = torch.full((2,), gamma if arm == 1 else 0)
        ensemble.commit(CommitInfo(output_tokens=torch.zeros(2, gamma + 1, dtype=torch.long), num_accepted=accepted,
                                   active=torch.ones(2, dtype=torch.bool)))
    ensemble.end()
    stats = ensemble.stats()
    assert stats["oracle"]["pulls"] > 0.85 * 200
    assert sum(a == 1 for a in ensemble.history[-50:]) >= 45
    assert stats["oracle"]["alpha"] == 1.0 and stats["random"]["alpha"] == 0.0


def test_drafter_config_is_plain_json(tmp_path):
    _lstm().save(str(tmp_path / "l"))
    meta = json.load(open(tmp_path / "l" / "config.json"))
    assert meta["kind"] == "lstm" and meta["config"]["model"]["hidden_size"] == 20
    assert set(os.listdir(tmp_path / "l")) == {"config.json", "model.safetensors"}


def test_ngram_fits_on_a_pseudo_dataset(tmp_path):
    """The seed's key idea: the n-gram learns the TARGET's outputs (fastspec pseudo's pseudo.jsonl)."""
    records = [{"index": i, "source_ids": [5, 6], "output_ids": [10 + i, 20, 21, 22, 23], "reference_ids": [9, 9]}
               for i in range(3)]
    with open(tmp_path / "pseudo.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    drafter = fit_ngram_drafter(load_pseudo_dataset(str(tmp_path)), V, 2, use_references=False, use_outputs=True,
                                start_token_id=0, smoothing=0.0)
    drafter.begin(_request(torch.tensor([[5, 6]])))
    assert drafter.draft(_step([[11, 20]], 3)).tokens.tolist() == [[21, 22, 23]]
    with pytest.raises(PseudoDatasetError, match="no pseudo-dataset here"):
        load_pseudo_dataset(str(tmp_path / "missing"))


def test_load_drafter_is_the_one_loader_for_layer_skip_with_exit_head(llama111, tmp_path):
    """A layer-skip folder with a trained exit head loads through load_drafter(folder, target), also
    when its config says `layerskip` (the kind's old spelling); without the target it says why."""
    from fastspec.drafters.folder import config_digest
    from fastspec.drafters.layer_skip import attach_exit_head, truncated_view

    view = truncated_view(llama111, 1)
    head = attach_exit_head(view)
    with torch.no_grad():
        head["head"].weight.mul_(0.5)  # "trained": differs from the target's own LM head
    LayerSkipDrafter(llama111, 1, view=view, exit_head=head).save(str(tmp_path / "ls"))
    meta = json.load(open(tmp_path / "ls" / "config.json"))
    assert meta["kind"] == "layer_skip" and meta["config"]["exit_head"] is True
    meta["kind"] = "layerskip"
    meta["config_sha256"] = config_digest(meta)
    json.dump(meta, open(tmp_path / "ls" / "config.json", "w"))
    loaded = load_drafter(str(tmp_path / "ls"), llama111)
    assert isinstance(loaded, LayerSkipDrafter) and loaded.num_layers == 1
    assert torch.equal(loaded.model.lm_head.weight, head["head"].weight)
    assert not torch.equal(loaded.model.lm_head.weight, llama111.lm_head.weight)
    with pytest.raises(UserError, match="needs its target"):
        load_drafter(str(tmp_path / "ls"))


def test_load_drafter_checks_the_vocabulary_of_every_kind(llama111, tmp_path):
    drafter = NgramDrafter.create(2, V + 1).fit([[1, 2, 3]])
    EnsembleDrafter([drafter, PromptLookupDrafter()]).save(str(tmp_path / "ens"))
    assert isinstance(load_drafter(str(tmp_path / "ens")), EnsembleDrafter)
    with pytest.raises(UserError, match=f"wrong vocab: the drafter has {V + 1} tokens, the target {V}"):
        load_drafter(str(tmp_path / "ens"), llama111)
