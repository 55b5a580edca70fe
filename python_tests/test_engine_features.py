"""The engine's side of the feature protocol (fastspec/drafters/feature.py's module docstring):
a FeatureDrafter in ``fastspec.generate`` is lossless (greedy equals HF, sampling χ²), and every
handed feature equals a teacher-forced full forward of the target at that position, once, in order.
"""
import pytest
import torch

import fastspec
from conftest import _llama
from fastspec.distill.feature import FeatureTrainConfig, pseudo_pairs, train_feature_drafter
from fastspec.drafters.feature import FeatureDrafter, eagle3_layers
from fastspec.skinny_linear import skinny_linears
from test_feature_drafter import _layer_features, bigram_llama, one_thread  # noqa: F401 (fixtures)
from test_engine_sampling import NUM_SAMPLES, PROMPT, SETTINGS, _chi2_critical, _chi2_stat, _hf_processors


class Recorder(FeatureDrafter):
    """A FeatureDrafter that records every handed feature per row (and the encoder states)."""

    def begin(self, request):
        super().begin(request)
        self.handed = [[] for _ in range(request.batch_size)]
        self.encoder = request.encoder_hidden_states
        self.commits = 0

    def commit(self, info):
        assert info.hidden_states.shape[0] == info.num_hidden.shape[0] == info.active.shape[0]
        assert bool((info.num_hidden[~info.active] == 0).all())
        for b in range(info.num_hidden.shape[0]):
            n = int(info.num_hidden[b])
            self.handed[b].append(info.hidden_states[b, :n].float().clone())
            assert not bool(info.hidden_states[b, n:].any())  # zero padded
        self.commits += 1
        super().commit(info)


@pytest.fixture(scope="module")
def small_llama():
    return _llama(97, seed=11, hidden=32, layers=4)


LLAMA_PROMPTS = [[5, 9, 14, 3, 77], [8, 21], [40, 41, 42, 43, 44, 45, 46, 47]]
T5_SOURCES = [[21603, 10, 8774, 296, 1], [100, 200, 1], [5, 6, 7, 8, 9, 10, 11, 1]]


def _pad(rows, left):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        start = width - len(row) if left else 0
        ids[b, start:start + len(row)], mask[b, start:start + len(row)] = torch.tensor(row), 1
    return ids, mask


def _new_tokens(sequences, prompt_width, eos):
    """Per row: the generated tokens up to and including the first EOS."""
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def _eos_that_ends_a_row(target, ids, mask, max_new, seq2seq):
    """A token that the target emits early in row 1 (so that row finishes mid-request)."""
    out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    new = out[:, 1:] if seq2seq else out[:, ids.shape[1]:]
    return int(new[1, 3])


def _check_handed(recorder, target, layers, seqs, sources=None):
    for b, seq in enumerate(seqs):
        got = torch.cat(recorder.handed[b], dim=0)
        assert got.shape[0] == len(seq) - 1, (b, got.shape, len(seq))  # every position but the last, once
        want = _layer_features(target, seq, layers, None if sources is None else sources[b])[: len(seq) - 1]
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", [(-1,), "eagle3", (0, -1)])
def test_causal_greedy_matches_hf_and_hands_teacher_features(small_llama, layers):
    layers = eagle3_layers(4) if layers == "eagle3" else layers
    ids, mask = _pad(LLAMA_PROMPTS, left=True)
    eos = _eos_that_ends_a_row(small_llama, ids, mask, 16, False)
    hf = small_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    drafter = Recorder(FeatureDrafter.from_target(small_llama, feature_layers=layers).model)
    out = fastspec.generate(small_llama, drafter, ids, mask, gamma=3, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(out.sequences, hf)
    new = _new_tokens(out.sequences, ids.shape[1], eos)
    assert len(new[1]) < 16 < len(new[0]) + 1  # row 1 was dropped mid-request, row 0 ran to the length
    assert drafter.encoder is None
    _check_handed(drafter, small_llama, layers, [p + n for p, n in zip(LLAMA_PROMPTS, new)])


def test_causal_right_padding_and_pending_prompt(small_llama):
    """Right padding: the prefill stops at the shortest row, the rest of the prompts are pending."""
    ids, mask = _pad(LLAMA_PROMPTS, left=False)
    drafter = Recorder(FeatureDrafter.from_target(small_llama).model)
    out = fastspec.generate(small_llama, drafter, ids, mask, gamma=2, max_new_tokens=9, eos_token_id=None)
    new = out.sequences[:, ids.shape[1]:].tolist()
    for prompt, row in zip(LLAMA_PROMPTS, new):  # each row alone equals HF
        hf = small_llama.generate(input_ids=torch.tensor([prompt]), max_new_tokens=9, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        assert hf[0, len(prompt):].tolist() == row
    _check_handed(drafter, small_llama, (-1,), [p + n for p, n in zip(LLAMA_PROMPTS, new)])


def test_t5_greedy_matches_hf_and_hands_teacher_features(tiny_t5):
    ids, mask = _pad(T5_SOURCES, left=False)
    eos = _eos_that_ends_a_row(tiny_t5, ids, mask, 12, True)
    hf = tiny_t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)
    drafter = Recorder(FeatureDrafter.from_target(tiny_t5, shortlist=torch.arange(0, 2000)).model)
    out = fastspec.generate(tiny_t5, drafter, ids, mask, gamma=3, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out.sequences, hf)
    # the engine's encoder pass has ≤ MAX_ROWS rows, so its linears take the skinny kernel: compare in its numerics
    with torch.no_grad(), skinny_linears(tiny_t5):
        encoder = tiny_t5.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(drafter.encoder, encoder)
    new = _new_tokens(out.sequences, 1, eos)
    assert len(new[1]) < 12
    _check_handed(drafter, tiny_t5, (-1,), [[0] + n for n in new], T5_SOURCES)


def test_trained_feature_drafter_is_lossless_and_accepts(bigram_llama):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(24)]
    pairs = pseudo_pairs(bigram_llama, prompts, max_new_tokens=16, batch_size=24)
    config = FeatureTrainConfig(max_steps=60, lr=3e-3, warmup_steps=5, batch_size=8, progress=False)
    drafter = train_feature_drafter(bigram_llama, pairs, config=config)
    ids, mask = _pad([[5, 9, 14, 3, 17], [8, 21], [40, 41, 42, 43, 44, 45, 46, 47]], left=True)
    hf = bigram_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    out = fastspec.generate(bigram_llama, drafter, ids, mask, gamma=4, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(out.sequences, hf)
    assert out.metrics.acceptance_rate > 0.2, out.metrics.acceptance_rate
    # a confidence threshold drafts fewer, surer tokens and stays lossless; near 1 it drafts none
    drafter.confidence_threshold = 0.6
    sure = fastspec.generate(bigram_llama, drafter, ids, mask, gamma=4, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(sure.sequences, hf)
    assert 0 < sure.metrics.num_draft_tokens < out.metrics.num_draft_tokens
    assert sure.metrics.acceptance_rate > out.metrics.acceptance_rate
    drafter.confidence_threshold = 0.999999
    none = fastspec.generate(bigram_llama, drafter, ids, mask, gamma=4, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(none.sequences, hf) and none.metrics.num_draft_tokens == 0
    with pytest.raises(ValueError, match="confidence_threshold"):
        FeatureDrafter(drafter.model, confidence_threshold=1.0)


def _exact_second_third(model, settings):
    """P(tokens 2 and 3 = (a, b)) [V,V], marginal over token 1, from the processed distributions."""
    procs = _hf_processors(**settings)
    vocab = model.config.vocab_size
    seq2seq = model.config.is_encoder_decoder
    prefix = torch.tensor([[model.config.decoder_start_token_id]]) if seq2seq else torch.tensor([PROMPT])
    source = torch.tensor([PROMPT])

    def next_probs(seqs):  # seqs [N,T] -> [N,V]
        with torch.no_grad():
            if seq2seq:
                logits = model(input_ids=source.repeat(seqs.shape[0], 1), decoder_input_ids=seqs).logits[:, -1]
            else:
                logits = model(seqs).logits[:, -1]
        return procs(seqs, logits).softmax(-1).double()

    grid = torch.arange(vocab)
    first = next_probs(prefix)[0]  # [V]
    one = torch.cat([prefix.repeat(vocab, 1), grid[:, None]], 1)  # [V,T+1]
    second = next_probs(one)  # [V,V]
    two = torch.cat([one.repeat_interleave(vocab, 0), grid.repeat(vocab)[:, None]], 1)  # [V·V,T+2]
    third = next_probs(two).view(vocab, vocab, vocab)
    return (first[:, None, None] * second[:, :, None] * third).sum(0)  # [V,V]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("target", ["tiny_vocab_llama", "tiny_vocab_t5"])
def test_feature_drafter_sampling_matches_target_distribution(request, target, setting):
    """Token 1 is a plain step (no features yet); tokens 2-3 are drafted (γ=2) and verified."""
    settings = SETTINGS[setting]
    model = request.getfixturevalue(target)
    vocab = model.config.vocab_size
    drafter = FeatureDrafter.from_target(model)
    ids = torch.tensor([PROMPT]).repeat(NUM_SAMPLES, 1)
    out = fastspec.generate(model, drafter, ids, gamma=2, do_sample=True, max_new_tokens=4, eos_token_id=None,
                            seed=2024, **settings)
    new = out.sequences[:, 1:] if model.config.is_encoder_decoder else out.sequences[:, len(PROMPT):]
    counts = torch.bincount(new[:, 1] * vocab + new[:, 2], minlength=vocab * vocab).reshape(vocab, vocab)
    stat, dof = _chi2_stat(counts, _exact_second_third(model, settings) * NUM_SAMPLES)
    assert stat < _chi2_critical(dof), (stat, dof)
    assert 0.0 < out.metrics.acceptance_rate < 1.0


def test_confidence_threshold_sampling_matches_target_distribution(tiny_vocab_llama):
    """Batch 1 (the threshold decides per step for the whole batch): steps draft 2, 1 or 0 tokens as
    q falls below the threshold, and token 3's marginal is still the target's."""
    model, settings, draws = tiny_vocab_llama, SETTINGS[sorted(SETTINGS)[0]], 1500
    drafter = FeatureDrafter(FeatureDrafter.from_target(model).model, confidence_threshold=0.34)
    widths, thirds = set(), []
    for seed in range(draws):
        out = fastspec.generate(model, drafter, torch.tensor([PROMPT]), gamma=2, do_sample=True, max_new_tokens=4,
                                eos_token_id=None, seed=seed, **settings)
        widths.add(out.metrics.num_draft_tokens)
        thirds.append(int(out.sequences[0, len(PROMPT) + 2]))
    # some requests drafted nothing, some had a 1-token step (odd totals), some drafted 2 at once
    assert 0 in widths and any(w % 2 for w in widths) and max(widths) >= 2, widths
    counts = torch.bincount(torch.tensor(thirds), minlength=model.config.vocab_size)
    stat, dof = _chi2_stat(counts[None], (_exact_second_third(model, settings).sum(0) * draws)[None])
    assert stat < _chi2_critical(dof), (stat, dof)
