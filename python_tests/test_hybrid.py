"""The hybrid drafter: PromptLookupDrafter(fallback=any drafter), chosen per row and per step.

Greedy: outputs identical to autoregressive decoding (causal and T5, batch 3) with a context
fallback (n-gram, random) and a commit-driven one (drafts from its own state, like the
FeatureDrafter). Per-row choice on a constructed case. Sampling: the first two emitted tokens
follow the target's processed distribution (χ², V=12), and a hybrid that declares the wrong q
for its lookup rows fails the same test.
"""
import pytest
import torch

import fastspec
import test_engine_sampling as sampling_test
from fastspec.drafters import NgramDrafter, PromptLookupDrafter, RandomDrafter
from fastspec.drafters.base import CommitInfo, DraftOutput, Drafter, DraftRequest, DraftStep, SamplingParams
from fastspec.drafters.feature import FeatureDrafter
from test_feature_drafter import one_thread  # noqa: F401  (autouse: one torch thread)




class CommitDrivenRandom(RandomDrafter):
    """A RandomDrafter that declares itself commit-driven (like the FeatureDrafter) and counts commits."""

    drafts_from_commits = True
    hidden_state_layers = None

    def begin(self, request):
        super().begin(request)
        self.commits = 0

    def commit(self, info):
        self.commits += 1


def _prompts(vocab, seed):
    """Batch 3, left padded: rows 0 and 2 repeat a segment (prompt lookup matches), row 1 does not."""
    gen = torch.Generator().manual_seed(seed)
    seg = torch.randint(3, vocab, (6,), generator=gen).tolist()
    rows = [seg + seg[:3], torch.randperm(vocab - 3, generator=gen)[:7].add(3).tolist(), [5] + seg + seg]
    width = max(map(len, rows))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = torch.tensor(row), 1
    return ids, mask


def _fallback(kind, vocab):
    if kind == "ngram":
        table = torch.randint(3, vocab, (40,), generator=torch.Generator().manual_seed(3)).tolist()
        return NgramDrafter.create(2, vocab, smoothing=0.0).fit([table])
    if kind == "random":
        return RandomDrafter(seed=1, deterministic=True)
    return CommitDrivenRandom(seed=1, deterministic=True)


@pytest.mark.parametrize("kind", ["ngram", "random", "commit_driven"])
@pytest.mark.parametrize("target", ["tiny_llama", "tiny_t5"])
def test_greedy_hybrid_equals_autoregressive(request, target, kind):
    model = request.getfixturevalue(target)
    vocab = model.config.vocab_size
    ids, mask = _prompts(min(vocab, 3001), seed=11)
    if model.config.is_encoder_decoder:  # seq2seq sources are right padded
        ids, mask = ids.flip(1), mask.flip(1)
    ar = fastspec.generate(model, None, ids, mask, max_new_tokens=24, do_sample=False)
    hybrid = PromptLookupDrafter(max_n=3, fallback=_fallback(kind, vocab))
    out = fastspec.generate(model, hybrid, ids, mask, gamma=4, max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, ar.sequences)
    assert out.metrics.num_draft_tokens > 0
    if kind == "commit_driven":
        assert hybrid.fallback.commits == out.metrics.num_steps  # the fallback saw every commit


def _request(sources, vocab, do_sample=False):
    ids = torch.tensor(sources)
    return DraftRequest(source_ids=ids, source_mask=torch.ones_like(ids), is_encoder_decoder=True, vocab_size=vocab,
                        decoder_start_token_id=0, sampling=SamplingParams(do_sample=do_sample, temperature=1.0),
                        generator=torch.Generator().manual_seed(0))


class FixedFallback(Drafter):
    """Commit-driven stub: drafts 70, 71, 72 in every row with a known q, asks for features."""

    deterministic = False
    drafts_from_commits = True
    hidden_state_layers = (-1,)

    def __init__(self, vocab):
        self.vocab_size = vocab
        self.commits = []

    def draft(self, step):
        batch = step.num_generated.shape[0]
        tokens = torch.tensor([[70, 71, 72]]).repeat(batch, 1)
        probs = torch.full((batch, 3, self.vocab_size), 0.5 / (self.vocab_size - 1))
        probs.scatter_(2, tokens[:, :, None], 0.5)
        return DraftOutput(tokens=tokens, probs=probs if self.request.sampling.do_sample else None)

    def commit(self, info):
        self.commits.append(info)


@pytest.mark.parametrize("do_sample", [False, True])
def test_each_row_takes_its_own_arm(do_sample):
    vocab = 100
    sources = [[50, 51, 52, 53, 54, 55]] * 3
    fallback = FixedFallback(vocab)
    hybrid = PromptLookupDrafter(max_n=2, fallback=fallback)
    assert hybrid.hidden_state_layers == (-1,) and PromptLookupDrafter().hidden_state_layers is None
    hybrid.begin(_request(sources, vocab, do_sample))
    generated = torch.tensor([[9, 51], [9, 99], [52, 53]])  # rows 0 and 2 match the source, row 1 does not
    step = DraftStep(generated=generated, num_generated=torch.tensor([2, 2, 2]), active=torch.ones(3, dtype=torch.bool),
                     gamma=3)
    out = hybrid.draft(step)
    assert hybrid.last_lookup_rows.tolist() == [True, False, True]
    assert out.tokens.tolist() == [[52, 53, 54], [70, 71, 72], [54, 55, 53]]  # row 2: 2 copied, then its last token
    if do_sample:
        assert out.probs.shape == (3, 3, vocab)
        for b, tokens in enumerate(out.tokens.tolist()):
            for j, token in enumerate(tokens):
                expected = 0.5 if b == 1 else 1.0  # one-hot on lookup tokens and pads, the fallback's q on its own
                assert float(out.probs[b, j, token]) == pytest.approx(expected)
                assert float(out.probs[b, j].sum()) == pytest.approx(1.0)
    else:
        assert out.probs is None
    info = CommitInfo(output_tokens=torch.tensor([[52, 53, 1, -1], [5, -1, -1, -1], [54, 7, -1, -1]]),
                      num_accepted=torch.tensor([2, 0, 1]), active=torch.ones(3, dtype=torch.bool))
    hybrid.commit(info)
    assert fallback.commits == [info]


def test_all_rows_matched_skips_a_commit_driven_fallback():
    vocab = 100
    fallback = FixedFallback(vocab)
    hybrid = PromptLookupDrafter(max_n=2, fallback=fallback)
    hybrid.begin(_request([[50, 51, 52, 53, 54, 55]], vocab))
    fallback.draft = None  # must not be called
    out = hybrid.draft(DraftStep(generated=torch.tensor([[50]]), num_generated=torch.tensor([1]),
                                 active=torch.ones(1, dtype=torch.bool), gamma=3))
    assert out.tokens.tolist() == [[51, 52, 53]]


class WrongQHybrid(PromptLookupDrafter):
    """Broken on purpose: declares the fallback's uniform q for lookup rows too."""

    def draft(self, step):
        out = super().draft(step)
        if out.probs is not None:
            out.probs = torch.full_like(out.probs, 1.0 / out.probs.shape[-1])
        return out


# the prompt ends with a repeated token: step 1 copies (lookup arm) for every row; step 2 copies
# only in rows whose first token occurs in the prompt, the other rows take the fallback's draft
HYBRID_PROMPT = [3, 5, 7, 4, 3]


@pytest.mark.parametrize("fallback", ["context", "commit_driven"])
@pytest.mark.parametrize("target", ["tiny_vocab_llama", "tiny_vocab_t5"])
def test_sampling_hybrid_matches_target_distribution(request, monkeypatch, target, fallback):
    monkeypatch.setattr(sampling_test, "PROMPT", HYBRID_PROMPT)
    model = request.getfixturevalue(target)
    settings = sampling_test.SETTINGS["warped"]
    stub = RandomDrafter(seed=5) if fallback == "context" else CommitDrivenRandom(seed=5)
    exact = sampling_test._exact_joint(model, settings)
    counts, metrics = sampling_test._sample_counts(model, PromptLookupDrafter(max_n=2, fallback=stub), 2, settings, 2024)
    stat, dof = sampling_test._chi2_stat(counts, exact * sampling_test.NUM_SAMPLES)
    assert stat < sampling_test._chi2_critical(dof), (stat, dof)
    assert 0.0 < metrics.acceptance_rate < 1.0


def test_wrong_q_for_lookup_rows_fails_the_same_test(tiny_vocab_llama, monkeypatch):
    # causal only: there every row copies at step 1 (a seq2seq output starts empty, so it copies at
    # step 2 only, too rarely on the V=12 T5 for this test's power: χ² 57 vs the bound 96 there)
    monkeypatch.setattr(sampling_test, "PROMPT", HYBRID_PROMPT)
    model = tiny_vocab_llama
    settings = sampling_test.SETTINGS["warped"]
    exact = sampling_test._exact_joint(model, settings)
    broken = WrongQHybrid(max_n=2, fallback=CommitDrivenRandom(seed=5))
    counts, _ = sampling_test._sample_counts(model, broken, 2, settings, 2024)
    stat, dof = sampling_test._chi2_stat(counts, exact * sampling_test.NUM_SAMPLES)
    assert stat > 3 * sampling_test._chi2_critical(dof), (stat, dof)


@pytest.mark.parametrize("target", ["tiny_llama", "tiny_t5"])
def test_greedy_hybrid_with_feature_fallback_equals_autoregressive(request, target):
    model = request.getfixturevalue(target)
    ids, mask = _prompts(3001, seed=11)
    if model.config.is_encoder_decoder:
        ids, mask = ids.flip(1), mask.flip(1)
    ar = fastspec.generate(model, None, ids, mask, max_new_tokens=24, do_sample=False)
    hybrid = PromptLookupDrafter(max_n=3, fallback=FeatureDrafter.from_target(model))
    assert hybrid.hidden_state_layers == (-1,)
    out = fastspec.generate(model, hybrid, ids, mask, gamma=4, max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, ar.sequences)


def _recording(drafter):
    """Wrap ``drafter.draft`` (on the instance) to record every draft's tokens."""
    drafts, draft = [], drafter.draft

    def record(step):
        out = draft(step)
        drafts.append(out.tokens.cpu().clone())
        return out

    drafter.draft = record
    return drafts


@pytest.mark.parametrize("fallback", ["feature", "layer_skip"])
def test_saved_hybrid_reloads_with_its_target(tiny_llama, tmp_path, fallback):
    from fastspec.drafters import LayerSkipDrafter
    from fastspec.drafters.io import load_drafter
    from fastspec.errors import UserError

    model = tiny_llama
    ids, mask = _prompts(3001, seed=11)
    ar = fastspec.generate(model, None, ids, mask, max_new_tokens=24, do_sample=False)
    inner = FeatureDrafter.from_target(model) if fallback == "feature" else LayerSkipDrafter(model, 1)
    hybrid = PromptLookupDrafter(max_n=3, min_n=2, fallback=inner)
    hybrid.save(str(tmp_path / "hybrid"))
    loaded = load_drafter(str(tmp_path / "hybrid"), target=model)
    assert isinstance(loaded, PromptLookupDrafter) and isinstance(loaded.fallback, type(inner))
    assert (loaded.max_n, loaded.min_n, loaded.hidden_state_layers) == (3, 2, hybrid.hidden_state_layers)
    outs, drafts = [], []
    for d in (hybrid, loaded):
        drafts.append(_recording(d))
        outs.append(fastspec.generate(model, d, ids, mask, gamma=4, max_new_tokens=24, do_sample=False))
    assert torch.equal(outs[0].sequences, ar.sequences) and torch.equal(outs[1].sequences, ar.sequences)
    assert len(drafts[0]) == len(drafts[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*drafts))
    with pytest.raises(UserError, match=f"a {fallback.replace('_', '-')} drafter needs its target") as err:
        load_drafter(str(tmp_path / "hybrid"))
    assert "\n" not in str(err.value) and "fallback" in str(err.value)


def test_confirm_n_takes_a_short_match_only_where_the_fallback_agrees():
    vocab = 100
    hybrid = PromptLookupDrafter(max_n=2, fallback=FixedFallback(vocab), confirm_n=2)  # the fallback drafts 70 71 72
    hybrid.begin(_request([[50, 51, 70, 53, 54, 55]] * 3, vocab))
    # row 0: "50" (n=1) copies 51.., the fallback disagrees; row 1: "51" copies 70.., it agrees; row 2: n=2
    generated = torch.tensor([[9, 50], [9, 51], [70, 53]])
    out = hybrid.draft(DraftStep(generated=generated, num_generated=torch.tensor([2, 2, 2]),
                                 active=torch.ones(3, dtype=torch.bool), gamma=3))
    assert out.tokens.tolist() == [[70, 71, 72], [70, 53, 54], [54, 55, 53]]
    assert hybrid.last_lookup_rows.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="commit-driven"):
        PromptLookupDrafter(max_n=3, fallback=NgramDrafter.create(2, vocab), confirm_n=2)
    with pytest.raises(ValueError, match="min_n < confirm_n <= max_n"):
        PromptLookupDrafter(max_n=3, min_n=2, fallback=FixedFallback(vocab), confirm_n=2)


@pytest.mark.parametrize("fallback", ["feature", "commit_driven"])
@pytest.mark.parametrize("target", ["tiny_llama", "tiny_t5"])
def test_greedy_hybrid_with_confirm_n_equals_autoregressive(request, tmp_path, target, fallback):
    from fastspec.drafters.io import load_drafter

    model = request.getfixturevalue(target)
    ids, mask = _prompts(3001, seed=11)
    if model.config.is_encoder_decoder:
        ids, mask = ids.flip(1), mask.flip(1)
    ar = fastspec.generate(model, None, ids, mask, max_new_tokens=24, do_sample=False)
    inner = FeatureDrafter.from_target(model) if fallback == "feature" else _fallback("commit_driven", 3001)
    hybrid = PromptLookupDrafter(max_n=3, fallback=inner, confirm_n=3)
    out = fastspec.generate(model, hybrid, ids, mask, gamma=4, max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, ar.sequences)
    if fallback == "feature":
        hybrid.save(str(tmp_path / "h"))
        assert load_drafter(str(tmp_path / "h"), target=model).confirm_n == 3
