"""Sampling losslessness (statistical): the joint distribution of the first two emitted tokens
under speculative sampling equals the target's own processed distribution (HF logits processors
applied autoregressively), for a V=12 target, with q ≠ p drafters. A verify that skips the
residual distribution must FAIL the same test."""
import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import fastspec
from fastspec import ops
from fastspec.drafters import RandomDrafter

PROMPT = [3, 5, 7, 4, 9]
NUM_SAMPLES = 6000
SETTINGS = {
    "plain": dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    "warped": dict(temperature=2.0, top_k=8, top_p=0.95, repetition_penalty=1.3),
}


def _hf_processors(temperature, top_k, top_p, repetition_penalty):
    # the order of HF generate(): penalties, then temperature, top-k, top-p warpers
    procs = []
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(procs)


def _exact_joint(model, settings):
    """P(first two tokens = (a, b)) from the target's processed distributions: [V,V]."""
    procs = _hf_processors(**settings)
    vocab = model.config.vocab_size
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        if model.config.is_encoder_decoder:  # the processors see the decoder ids, as in HF
            start = torch.tensor([[model.config.decoder_start_token_id]])
            first = procs(start, model(input_ids=prompt, decoder_input_ids=start).logits[:, -1]).softmax(-1)[0]
            seconds = torch.cat([start.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)  # [V,2]
            logits = model(input_ids=prompt.repeat(vocab, 1), decoder_input_ids=seconds).logits[:, -1]
        else:
            first = procs(prompt, model(prompt).logits[:, -1]).softmax(-1)[0]  # [V]
            seconds = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)  # [V,S+1]
            logits = model(seconds).logits[:, -1]
        second = procs(seconds, logits).softmax(-1)  # [V,V]
    return (first[:, None] * second).double()


def _chi2_stat(counts, expected):
    """Pearson χ² with cells of expected < 5 merged into one; returns (stat, dof)."""
    counts, expected = counts.flatten().double(), expected.flatten().double()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    # mass where the target has probability 0 must never be sampled
    assert float(obs[~keep].sum()) == 0.0, "sampled a token the target forbids"
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def _chi2_critical(dof, z=3.72):
    """Wilson–Hilferty upper quantile of χ²(dof); z = 3.72 is p = 1e-4."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _sample_counts(model, drafter, gamma, settings, seed):
    vocab = model.config.vocab_size
    ids = torch.tensor([PROMPT]).repeat(NUM_SAMPLES, 1)
    # γ + 1 new tokens: the engine drafts at most what a row may still emit − 1, so the first step
    # drafts all γ; the first two emitted tokens are counted
    out = fastspec.generate(
        model, drafter, ids, gamma=gamma, do_sample=True, max_new_tokens=max(gamma, 1) + 1, eos_token_id=None,
        seed=seed, **settings,
    )
    new = out.sequences[:, 1:] if model.config.is_encoder_decoder else out.sequences[:, len(PROMPT):]
    assert new.shape == (NUM_SAMPLES, max(gamma, 1) + 1)
    new = new[:, :2]
    counts = torch.bincount(new[:, 0] * vocab + new[:, 1], minlength=vocab * vocab).reshape(vocab, vocab)
    return counts, out.metrics


def _broken_fused_verify(target_logits, draft_tokens, draft_probs, *, prev_tokens=None, generator=None, **kw):
    """Speculative sampling WITHOUT the residual: on rejection it samples from p, not norm(max(0, p − q))."""
    p = ops.process_logits(target_logits, prev_tokens=prev_tokens, draft_tokens=draft_tokens, **kw)  # [B,γ+1,V]
    batch, gamma = draft_tokens.shape
    vocab = p.shape[-1]
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(draft_tokens, vocab).float()
    p_draft = p[:, :gamma].gather(2, draft_tokens[:, :, None])[..., 0]
    q_draft = draft_probs.gather(2, draft_tokens[:, :, None])[..., 0]
    u = torch.rand(batch, gamma, generator=generator)
    accept = u < (p_draft / q_draft).clamp(max=1)
    num_accepted = torch.cumprod(accept.long(), dim=1).sum(1)  # [B]
    out = torch.full((batch, gamma + 1), -1, dtype=torch.long)
    for row in range(batch):
        n = int(num_accepted[row])
        out[row, :n] = draft_tokens[row, :n]
        out[row, n] = int(torch.multinomial(p[row, n], 1, generator=generator))
    return out, num_accepted


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize(
    "drafter_kind,gamma", [("uniform_q", 1), ("uniform_q", 3), ("one_hot_q", 2), ("autoregressive", 0)]
)
@pytest.mark.parametrize("target", ["tiny_vocab_llama", "tiny_vocab_t5"])
def test_speculative_sampling_matches_target_distribution(request, target, setting, drafter_kind, gamma):
    settings = SETTINGS[setting]
    model = request.getfixturevalue(target)
    drafter = {
        "uniform_q": lambda: RandomDrafter(seed=5),
        "one_hot_q": lambda: RandomDrafter(seed=5, deterministic=True),
        "autoregressive": lambda: None,
    }[drafter_kind]()
    exact = _exact_joint(model, settings)
    counts, metrics = _sample_counts(model, drafter, max(gamma, 1), settings, seed=2024)
    stat, dof = _chi2_stat(counts, exact * NUM_SAMPLES)
    assert stat < _chi2_critical(dof), (stat, dof)
    if drafter is not None:
        assert 0.0 < metrics.acceptance_rate < 1.0  # both the accept and the residual paths ran


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("target", ["tiny_vocab_llama", "tiny_vocab_t5"])
def test_skipping_the_residual_fails_the_same_test(request, target, monkeypatch, setting):
    """The statistical test has power: the classic bug (resample from p after a rejection) fails it."""
    settings = SETTINGS[setting]
    model = request.getfixturevalue(target)
    monkeypatch.setattr(ops, "fused_verify", _broken_fused_verify)
    exact = _exact_joint(model, settings)
    counts, _ = _sample_counts(model, RandomDrafter(seed=5), 2, settings, seed=2024)
    stat, dof = _chi2_stat(counts, exact * NUM_SAMPLES)
    assert stat > 3 * _chi2_critical(dof), (stat, dof)


@pytest.mark.parametrize("target", ["tiny_vocab_llama", "tiny_vocab_t5"])
def test_exact_distribution_is_not_trivial(request, target):
    """Guard: p is far from the drafter's uniform q, so a verify bug has something to show."""
    exact = _exact_joint(request.getfixturevalue(target), SETTINGS["plain"])
    first = exact.sum(1)
    tv_to_uniform = 0.5 * float((first - 1 / first.numel()).abs().sum())
    assert tv_to_uniform > 0.2
