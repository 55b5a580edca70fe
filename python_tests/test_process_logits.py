"""process_logits (native and reference) against transformers' own logits processors.

The processed distribution must be what HF's RepetitionPenaltyLogitsProcessor ->
TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> softmax gives. HF works in
float32 and we in float64, so probabilities agree to ~1e-7 and the kept set agrees exactly except
for tokens whose HF cumulative probability sits within float32 rounding of the top-p threshold.
"""
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastspec import ops

IMPLS = {"native": ops.process_logits, "reference": ops.reference.process_logits}
CONFIGS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=50),
    dict(top_p=0.9),
    dict(repetition_penalty=1.3),
    dict(temperature=1.5, top_k=300, top_p=0.8, repetition_penalty=1.2),
    dict(temperature=0.5, top_k=1),
    dict(top_k=20, top_p=0.5, repetition_penalty=0.8),  # penalty < 1 boosts seen tokens
]


def hf_processors(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


def hf_cumulative_at(scores: torch.Tensor) -> torch.Tensor:
    """HF TopPLogitsWarper's ascending cumulative probability at each token, [B,V]."""
    sorted_logits, order = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    return torch.empty_like(cum).scatter_(-1, order, cum)


def assert_matches_hf(ours: torch.Tensor, hf_scores_before_top_p: torch.Tensor, hf_probs: torch.Tensor, top_p: float):
    """ours, hf_probs [B,V] probabilities. Kept sets equal except within float32 rounding of top-p."""
    differ = (ours > 0) != (hf_probs > 0)
    if differ.any():
        assert top_p < 1.0, "support differs although top-p is off"
        cum = hf_cumulative_at(hf_scores_before_top_p)
        assert ((cum[differ] - (1 - top_p)).abs() < 2e-5).all(), "support differs away from the top-p boundary"
        assert differ.sum() <= 2 * ours.shape[0]
        return
    # HF softmaxes in float32, we accumulate in float64: relative gaps up to ~1.3e-5 seen at T=0.7, V=49152
    torch.testing.assert_close(ours, hf_probs, rtol=3e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [111, 32128, 49152])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sampling_distribution_equals_hf(impl, vocab, config):
    g = torch.Generator().manual_seed(vocab)
    B, K = 3, 3
    logits = torch.randn(B, K, vocab, generator=g) * 3  # [B,K,V]
    prev = torch.randint(0, vocab, (B, 12), generator=g)  # [B,L]
    draft = torch.randint(0, vocab, (B, K - 1), generator=g)  # [B,K-1]
    ours = IMPLS[impl](logits, prev_tokens=prev, draft_tokens=draft, **config)
    assert ours.dtype == torch.float32 and ours.shape == (B, K, vocab)
    pre_top_p = dict(config, top_p=1.0)
    for k in range(K):
        seen = torch.cat([prev, draft[:, :k]], dim=1)  # position k also sees the drafts before it
        hf_probs = hf_processors(**config)(seen, logits[:, k].clone()).softmax(-1)
        hf_pre = hf_processors(**pre_top_p)(seen, logits[:, k].clone())
        assert_matches_hf(ours[:, k], hf_pre, hf_probs, config.get("top_p", 1.0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [111, 32128])
def test_greedy_returns_hf_penalised_logits_exactly(impl, vocab):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, vocab, generator=g)
    prev = torch.randint(0, vocab, (3, 9), generator=g)
    draft = torch.randint(0, vocab, (3, 1), generator=g)
    ours = IMPLS[impl](logits, prev_tokens=prev, draft_tokens=draft, do_sample=False, repetition_penalty=1.7)
    for k in range(2):
        seen = torch.cat([prev, draft[:, :k]], dim=1)
        hf = RepetitionPenaltyLogitsProcessor(1.7)(seen, logits[:, k].clone())
        assert torch.equal(ours[:, k], hf)


@pytest.mark.parametrize("vocab", [111, 32128, 49152])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_equals_reference_16bit(vocab, dtype):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 2, vocab, generator=g) * 4).to(dtype)  # bf16 logits are full of ties
    prev = torch.randint(-1, vocab, (3, 5), generator=g)
    config = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1)
    a = ops.process_logits(logits, prev_tokens=prev, **config)
    b = ops.reference.process_logits(logits, prev_tokens=prev, **config)
    assert torch.equal(a > 0, b > 0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # and 16-bit input means exactly its float32 upcast
    c = ops.process_logits(logits.float(), prev_tokens=prev, **config)
    assert torch.equal(a, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_worked_top_k_keeps_ties(impl):
    # k = 2: the 2nd largest value is 2 and three tokens hold it, so all four of {3, 2, 2, 2} stay.
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    probs = IMPLS[impl](logits, top_k=2)
    assert (probs > 0).tolist() == [[True, True, True, True, False]]
    torch.testing.assert_close(probs, torch.tensor([[3.0, 2, 2, 2, -1e9]]).softmax(-1))


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_worked_top_p(impl):
    # p = [0.5, 0.25, 0.125, 0.125]; top_p = 0.75: token 0 (mass above 0) and token 1 (mass above
    # 0.5) stay, token 2 has 0.75 above it and goes, as HF (ascending cumsum 0.125, 0.25 <= 0.25).
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    probs = IMPLS[impl](logits, top_p=0.75)
    torch.testing.assert_close(probs, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    hf = TopPLogitsWarper(0.75)(None, logits.clone()).softmax(-1)
    torch.testing.assert_close(probs, hf)


@pytest.mark.parametrize("impl", IMPLS)
def test_top_p_ties_break_by_index_like_hf_stable_sort(impl):
    # Four equal logits and top_p = 0.5: HF's (stable) ascending sort removes the lower indices
    # first, so the two highest indices stay.
    logits = torch.zeros(1, 4)
    probs = IMPLS[impl](logits, top_p=0.5)
    assert probs.tolist() == [[0.0, 0.0, 0.5, 0.5]]
    hf = TopPLogitsWarper(0.5)(None, logits.clone()).softmax(-1)
    assert torch.equal(probs, hf)


@pytest.mark.parametrize("impl", IMPLS)
def test_repetition_penalty_hand_worked(impl):
    # Seen ids 0 (logit 2 -> 2/2) and 1 (logit -1 -> -1*2); id 2 unseen; -1 and 7 (>= V) ignored.
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = IMPLS[impl](logits, prev_tokens=torch.tensor([[0, 1, -1, 7, 0]]), do_sample=False, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]


@pytest.mark.parametrize("impl", IMPLS)
def test_position_k_sees_drafts_before_it(impl):
    # Drafted token 1 at position 0 is penalised from position 1 on, not at position 0.
    logits = torch.tensor([[[1.0, 4.0, 2.0], [1.0, 4.0, 2.0]]])
    out = IMPLS[impl](logits, draft_tokens=torch.tensor([[1]]), do_sample=False, repetition_penalty=4.0)
    assert out.tolist() == [[[1.0, 4.0, 2.0], [1.0, 1.0, 2.0]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_two_dimensional_logits(impl):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    probs = IMPLS[impl](logits, temperature=0.9)
    assert probs.shape == (2, 50)
    torch.testing.assert_close(probs, (logits / 0.9).softmax(-1))


def test_non_contiguous_logits():
    logits = torch.randn(50, 2, 3, generator=torch.Generator().manual_seed(4)).permute(1, 2, 0)  # [2,3,50]
    assert not logits.is_contiguous()
    torch.testing.assert_close(ops.process_logits(logits, top_k=5), ops.process_logits(logits.contiguous(), top_k=5))


BAD = [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_settings(impl, kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        IMPLS[impl](torch.randn(2, 3, 10), **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs(impl):
    f = IMPLS[impl]
    x = torch.randn(2, 3, 10)
    with pytest.raises((ValueError, RuntimeError), match="rank"):
        f(torch.randn(2, 3, 4, 10))
    with pytest.raises((ValueError, RuntimeError), match="float"):
        f(torch.zeros(2, 3, 10, dtype=torch.long))
    with pytest.raises((ValueError, RuntimeError), match="draft_tokens"):
        f(x, draft_tokens=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises((ValueError, RuntimeError), match="draft token|outside"):
        f(x, draft_tokens=torch.tensor([[0, 10], [0, 0]]))
    with pytest.raises((ValueError, RuntimeError), match="prev_tokens"):
        f(x, prev_tokens=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises((ValueError, RuntimeError), match="device"):
        f(x, prev_tokens=torch.zeros(2, 4, dtype=torch.long, device="meta"))
    nan = x.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises((ValueError, RuntimeError), match="NaN"):
        f(nan)
    posinf = x.clone()
    posinf[0, 0, 0] = float("inf")
    with pytest.raises((ValueError, RuntimeError), match=r"\+inf"):
        f(posinf)
    with pytest.raises((ValueError, RuntimeError), match="-inf"):
        f(torch.full((1, 1, 5), float("-inf")))
