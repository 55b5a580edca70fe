"""verify_greedy / verify_sample / fused_verify: native == reference, hand-worked cases,
statistics of speculative sampling, invariants, determinism, fuzzing and bad input."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastspec import ops

REF = ops.reference


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_same(a, b):
    assert torch.equal(a[0], b[0]), f"output_tokens differ:\n{a[0]}\n{b[0]}"
    assert torch.equal(a[1], b[1]), f"num_accepted differ: {a[1]} vs {b[1]}"


def assert_invariants(out, num_accepted, draft):
    B, K = out.shape
    assert out.dtype == torch.int64 and num_accepted.dtype == torch.int64
    assert ((num_accepted >= 0) & (num_accepted <= K - 1)).all()
    positions = torch.arange(K).expand(B, K)
    valid = positions <= num_accepted[:, None]
    assert ((out >= 0) == valid).all(), "-1 padding must be contiguous after num_accepted + 1 tokens"
    assert (out[~valid] == -1).all()
    assert ((out >= 0).sum(1) == num_accepted + 1).all()
    accepted = positions < num_accepted[:, None]
    assert torch.equal(out[accepted], draft[accepted[:, : K - 1]]) if K > 1 else True


def make_case(B, gamma, V, seed, closeness=0.5, dtype=torch.float32):
    """Target logits, a drafter's q close to the target's p, and drafts sampled from q."""
    g = gen(seed)
    logits = torch.randn(B, gamma + 1, V, generator=g) * 2  # [B,γ+1,V]
    q = torch.softmax(logits[:, :gamma] + closeness * torch.randn(B, gamma, V, generator=g), -1)  # [B,γ,V]
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, gamma) if gamma else torch.zeros(
        B, 0, dtype=torch.long)
    return logits.to(dtype), q.to(dtype), draft


def test_native_is_built():
    assert ops.native_available(), "fastspec._C is not built: run the README install command"
    for name in ("verify_greedy", "verify_sample", "process_logits", "fused_verify"):
        assert hasattr(torch.ops.fastspec, name)


# ----------------------------------------------------------------------------- native == reference
SHAPES = [(1, 1, 111), (3, 4, 111), (3, 7, 111), (8, 8, 111), (1, 8, 32128), (3, 2, 32128), (8, 5, 32128), (3, 3, 49152),
          (1, 6, 49152)]


@pytest.mark.parametrize("B,gamma,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_verify_greedy_native_equals_reference(B, gamma, V, dtype):
    logits, _, _ = make_case(B, gamma, V, seed=B * 100 + gamma, dtype=dtype)
    target = logits.float().argmax(-1)
    draft = target[:, :gamma].clone()
    draft[:, gamma // 2] = (draft[:, gamma // 2] + 1) % V  # a mismatch mid-way in every row
    draft[0] = target[0, :gamma]  # row 0 fully accepted: bonus token
    out = ops.verify_greedy(logits, draft)
    assert_same(out, REF.verify_greedy(logits, draft))
    assert_invariants(*out, draft)
    assert out[1][0] == gamma and out[0][0, gamma] == target[0, gamma]


@pytest.mark.parametrize("B,gamma,V", SHAPES)
@pytest.mark.parametrize("deterministic_drafter", [False, True])
def test_verify_sample_native_equals_reference(B, gamma, V, deterministic_drafter):
    logits, q, draft = make_case(B, gamma, V, seed=7 + B + gamma)
    p = torch.softmax(logits, -1)
    q = None if deterministic_drafter else q
    for seed in range(3):
        out = ops.verify_sample(p, q, draft, generator=gen(seed))
        assert_same(out, REF.verify_sample(p, q, draft, generator=gen(seed)))
        assert_invariants(*out, draft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_verify_sample_16bit_inputs(dtype):
    logits, q, draft = make_case(3, 4, 32128, seed=11)
    p, q = torch.softmax(logits, -1).to(dtype), q.to(dtype)
    out = ops.verify_sample(p, q, draft, generator=gen(0))
    assert_same(out, REF.verify_sample(p, q, draft, generator=gen(0)))
    # 16-bit means its exact float32 upcast (renormalised within tolerance)
    assert_same(out, ops.verify_sample(p.float(), q.float(), draft, generator=gen(0)))


FUSED_CONFIGS = [
    dict(do_sample=False),
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=True),
    dict(do_sample=True, temperature=0.7, top_k=50),
    dict(do_sample=True, top_p=0.9),
    dict(do_sample=True, temperature=1.3, top_k=500, top_p=0.8, repetition_penalty=1.2),
]


@pytest.mark.parametrize("B,gamma,V", [(1, 1, 111), (3, 4, 111), (8, 8, 111), (3, 3, 32128), (8, 5, 32128),
                                       (1, 2, 49152)])
@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("deterministic_drafter", [False, True])
def test_fused_verify_native_equals_reference(B, gamma, V, config, deterministic_drafter):
    logits, _, _ = make_case(B, gamma, V, seed=B + gamma + V)
    g = gen(5)
    prev = torch.randint(-1, V, (B, 16), generator=g)
    # the drafter's q is processed with the target's settings, as drafters do
    q_logits = logits[:, :gamma].float() + 0.5 * torch.randn(B, gamma, V, generator=g)
    sampling = {k: v for k, v in config.items() if k != "do_sample"}
    q = ops.process_logits(q_logits, prev_tokens=prev, **sampling) if config["do_sample"] else None
    if q is not None:
        draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, gamma)
    else:
        draft = logits[:, :gamma].argmax(-1)
        draft[:, -1] = (draft[:, -1] + 1) % V
    if deterministic_drafter:
        q = None
    for seed in range(2):
        out = ops.fused_verify(logits, draft, q, prev_tokens=prev, generator=gen(seed), **config)
        assert_same(out, REF.fused_verify(logits, draft, q, prev_tokens=prev, generator=gen(seed), **config))
        assert_invariants(*out, draft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("do_sample", [False, True])
def test_fused_verify_16bit_logits(dtype, do_sample):
    logits, q, draft = make_case(3, 4, 32128, seed=3, dtype=dtype)
    q = q.float() if do_sample else None
    kw = dict(do_sample=do_sample, top_k=100, repetition_penalty=1.1) if do_sample else dict()
    out = ops.fused_verify(logits, draft, q, generator=gen(1), **kw)
    assert_same(out, REF.fused_verify(logits, draft, q, generator=gen(1), **kw))
    assert_same(out, ops.fused_verify(logits.float(), draft, q, generator=gen(1), **kw))


def test_fused_equals_process_then_verify():
    # The fused path is process_logits followed by verify_sample / verify_greedy on the result.
    B, gamma, V = 3, 4, 32128
    logits, _, _ = make_case(B, gamma, V, seed=21)
    prev = torch.randint(0, V, (B, 10), generator=gen(1))
    cfg = dict(temperature=0.8, top_k=200, top_p=0.95, repetition_penalty=1.15)
    q = ops.process_logits(logits[:, :gamma] + 0.3, prev_tokens=prev, **cfg)  # a shifted drafter
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=gen(2)).reshape(B, gamma)
    p = ops.process_logits(logits, prev_tokens=prev, draft_tokens=draft, **cfg)
    fused = ops.fused_verify(logits, draft, q, prev_tokens=prev, do_sample=True, generator=gen(3), **cfg)
    assert_same(fused, ops.verify_sample(p, q, draft, generator=gen(3)))
    penalised = ops.process_logits(logits, prev_tokens=prev, draft_tokens=draft, do_sample=False,
                                   repetition_penalty=1.15)
    greedy = ops.fused_verify(logits, draft, prev_tokens=prev, repetition_penalty=1.15)
    assert_same(greedy, ops.verify_greedy(penalised, draft))


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_gamma_zero_is_autoregressive(impl, do_sample):
    f = ops.fused_verify if impl == "native" else REF.fused_verify
    logits = torch.randn(4, 1, 300, generator=gen(0))
    out, n = f(logits, torch.zeros(4, 0, dtype=torch.long), do_sample=do_sample, top_k=30, generator=gen(9))
    assert out.shape == (4, 1) and n.tolist() == [0, 0, 0, 0]
    if not do_sample:
        assert torch.equal(out[:, 0], logits[:, 0].argmax(-1))
    else:  # the token is drawn by inverse CDF of the top-30 distribution with u[:, 0]
        u = torch.rand(4, 1, generator=gen(9), dtype=torch.float64)[:, 0]
        probs = ops.reference.process_logits(logits[:, 0], top_k=30).double()
        expected = (probs.cumsum(-1) <= (u * probs.cumsum(-1)[:, -1])[:, None]).sum(-1)
        assert torch.equal(out[:, 0], expected)


# ----------------------------------------------------------------------------- hand-worked cases
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_greedy_hand_worked(impl):
    f = ops.verify_greedy if impl == "native" else REF.verify_greedy
    logits = torch.tensor([[[0.0, 5.0, 1.0], [4.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
                           [[0.0, 5.0, 1.0], [4.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
                           [[2.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0]]])
    draft = torch.tensor([[1, 2],   # 1 matches argmax 1; 2 != argmax 0: recovered 0
                          [1, 0],   # both match: bonus = argmax of last position = 2
                          [1, 0]])  # tie 2,2 at position 0: argmax is the FIRST index, 0 != 1
    out, n = f(logits, draft)
    assert out.tolist() == [[1, 0, -1], [1, 0, 2], [0, -1, -1]]
    assert n.tolist() == [1, 2, 0]


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_sample_hand_worked_acceptance_rule(impl):
    f = ops.verify_sample if impl == "native" else REF.verify_sample
    # One draft d = 1: p(d) = 0.25, q(d) = 0.5, so accept iff u0 < 0.5. The residual
    # max(0, p - q) is [0.375, 0, 0.125, 0] -> norm [0.75, 0, 0.25, 0]: token 0 iff u1 < 0.75.
    p = torch.tensor([[[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 0.0, 1.0]]])
    q = torch.tensor([[[0.125, 0.5, 0.0, 0.375]]])
    d = torch.tensor([[1]])
    outcomes = set()
    for seed in range(40):  # seeds giving u0 below / above 0.5 and u1 below / above 0.75
        u = torch.rand(1, 2, generator=gen(seed), dtype=torch.float64)[0]
        out, n = f(p, q, d, generator=gen(seed))
        if u[0] < 0.5:
            assert n.item() == 1 and out.tolist() == [[1, 3]]  # accepted, bonus from p[1] = token 3
            outcomes.add("accepted")
        else:
            recovered = 0 if u[1] < 0.75 else 2
            outcomes.add(recovered)
            assert n.item() == 0 and out.tolist() == [[recovered, -1]]
    assert outcomes == {"accepted", 0, 2}


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_one_hot_targets_give_exact_outputs(impl):
    # With a one-hot target the output is the target's path whatever q and u are: a draft equal
    # to the target token has p = 1 > u q, any other p = 0; the residual is one-hot at the target.
    f = ops.verify_sample if impl == "native" else REF.verify_sample
    B, gamma, V = 8, 5, 111
    target = torch.randint(0, V, (B, gamma + 1), generator=gen(0))
    p = torch.nn.functional.one_hot(target, V).float()
    draft = target[:, :gamma].clone()
    cut = torch.randint(0, gamma + 1, (B,), generator=gen(1))  # first wrong draft (gamma: none)
    for b in range(B):
        if cut[b] < gamma:
            draft[b, cut[b]] = (draft[b, cut[b]] + 1 + b) % V
    q = torch.softmax(torch.randn(B, gamma, V, generator=gen(2)), -1)
    expected = ops.verify_greedy(p, draft)
    for qq in (q, None):
        for seed in range(3):
            assert_same(f(p, qq, draft, generator=gen(seed)), expected)
    assert expected[1].tolist() == cut.tolist()


# ----------------------------------------------------------------------------- statistics
def tv_distance(samples: torch.Tensor, probs: torch.Tensor) -> float:
    hist = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * (hist - probs.double()).abs().sum().item()


P0 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
P1 = torch.tensor([0.30, 0.10, 0.20, 0.25, 0.15])
Q0 = torch.tensor([0.35, 0.05, 0.40, 0.10, 0.10])  # far from P0: rejections are frequent
Q1 = torch.tensor([0.10, 0.40, 0.10, 0.20, 0.20])


def run_two_step(N, seed, deterministic=False, fused=False):
    """N independent rows of a γ=2 step with fixed p, q; drafts sampled from q."""
    g = gen(seed)
    q = torch.stack([Q0, Q1]).expand(N, 2, 5).contiguous()  # [N,2,5]
    draft = torch.multinomial(q.reshape(-1, 5), 1, generator=g).reshape(N, 2)
    p = torch.stack([P0, P1, P1]).expand(N, 3, 5).contiguous()  # [N,3,5]
    if deterministic:
        q = None
    if fused:
        return draft, ops.fused_verify(p.log(), draft, q, do_sample=True, generator=g)
    return draft, ops.verify_sample(p, q, draft, generator=g)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_emitted_tokens_follow_the_target(deterministic, fused):
    tvs = []
    for N in (2_000, 20_000, 200_000):
        draft, (out, n) = run_two_step(N, seed=N, deterministic=deterministic, fused=fused)
        tvs.append(tv_distance(out[:, 0], P0))
        if N == 200_000:
            # the second token, given that the first draft was accepted, follows p1
            second = out[n >= 1, 1]
            assert tv_distance(second, P1) < 0.01
    assert tvs[2] < 0.006 and tvs[2] < tvs[0], f"TV distances {tvs} do not shrink to 0"


def test_skipping_the_residual_would_fail():
    # A broken verifier that resamples from p (not norm(max(0, p - q))) after a rejection emits
    # a wrong distribution; the same statistic that passes above must catch it.
    N = 200_000
    draft, (out, n) = run_two_step(N, seed=1)
    broken = torch.where(n >= 1, draft[:, 0], torch.multinomial(P0.expand(N, 5), 1, generator=gen(2))[:, 0])
    assert tv_distance(out[:, 0], P0) < 0.006
    assert tv_distance(broken, P0) > 0.05


def test_acceptance_counts_match_theory():
    # One position: P(accept) = Σ min(p, q). Two positions: P(n=0)=1-a0, P(n=1)=a0(1-a1), P(n=2)=a0 a1.
    N = 200_000
    _, (_, n) = run_two_step(N, seed=3)
    a0 = torch.minimum(P0, Q0).sum().item()
    a1 = torch.minimum(P1, Q1).sum().item()
    theory = torch.tensor([1 - a0, a0 * (1 - a1), a0 * a1])
    observed = torch.bincount(n, minlength=3).double() / N
    sigma = (theory * (1 - theory) / N).sqrt()
    assert ((observed - theory).abs() < 5 * sigma).all(), f"{observed} vs {theory}"


def test_deterministic_drafter_acceptance_is_p_of_draft():
    # q one-hot at the draft: accept iff u < p(d).
    N = 100_000
    V = 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draft = torch.full((N, 1), 2)
    _, n = ops.verify_sample(p.expand(N, 2, V).contiguous(), None, draft, generator=gen(4))
    rate = n.double().mean().item()
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / N)


# ----------------------------------------------------------------------------- determinism
def test_seeded_determinism():
    logits, q, draft = make_case(8, 5, 32128, seed=1)
    p = torch.softmax(logits, -1)
    a = ops.verify_sample(p, q, draft, generator=gen(123))
    b = ops.verify_sample(p, q, draft, generator=gen(123))
    assert_same(a, b)
    f1 = ops.fused_verify(logits, draft, q, do_sample=True, generator=gen(7))
    f2 = ops.fused_verify(logits, draft, q, do_sample=True, generator=gen(7))
    assert_same(f1, f2)
    outs = {tuple(ops.verify_sample(p, q, draft, generator=gen(s))[0].flatten().tolist()) for s in range(5)}
    assert len(outs) > 1, "different seeds should give different samples"


# ----------------------------------------------------------------------------- fuzz
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 4),
    gamma=st.integers(0, 6),
    V=st.integers(1, 300),
    scale=st.sampled_from([1e-3, 1.0, 8.0, 300.0]),
    integer_logits=st.booleans(),  # many ties
    neg_inf=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    do_sample=st.booleans(),
    temperature=st.sampled_from([1.0, 0.3, 2.0]),
    top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.75, 0.5, 0.37]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.7]),
    deterministic=st.booleans(),
)
def test_fuzz_native_equals_reference(B, gamma, V, scale, integer_logits, neg_inf, seed, do_sample, temperature,
                                      top_k, top_p, repetition_penalty, deterministic):
    g = gen(seed)
    logits = torch.randn(B, gamma + 1, V, generator=g) * scale
    if integer_logits:
        logits = logits.round()
    if neg_inf and V > 1:
        logits[..., torch.randint(0, V, (1,), generator=g)] = float("-inf")
    cfg = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
               repetition_penalty=repetition_penalty)
    prev = torch.randint(-2, V + 2, (B, 5), generator=g)
    draft = torch.randint(0, V, (B, gamma), generator=g)
    q = None
    if do_sample and not deterministic:
        q = torch.softmax(torch.randn(B, gamma, V, generator=g), -1)
    out = ops.fused_verify(logits, draft, q, prev_tokens=prev, generator=gen(seed + 1), **cfg)
    ref = REF.fused_verify(logits, draft, q, prev_tokens=prev, generator=gen(seed + 1), **cfg)
    assert_same(out, ref)
    assert_invariants(*out, draft)
    p = torch.softmax(logits.clamp(min=-1e30), -1)
    assert_same(ops.verify_sample(p, q, draft, generator=gen(seed)), REF.verify_sample(p, q, draft, generator=gen(seed)))
    assert_same(ops.verify_greedy(logits, draft), REF.verify_greedy(logits, draft))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dshape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    value=st.sampled_from([0.0, -1.0, 1.0, float("nan"), float("inf"), float("-inf"), 1e30]),
    token=st.integers(-3, 8),
    op=st.sampled_from(["greedy", "sample", "fused", "fused_sample", "process"]),
)
def test_fuzz_garbage_never_crashes(shape, dshape, value, token, op):
    """Garbage in: either a ValueError/RuntimeError that says what is wrong, or valid outputs."""
    x = torch.full(shape, value)
    d = torch.full(dshape, token, dtype=torch.long)
    try:
        if op == "greedy":
            result = ops.verify_greedy(x, d)
        elif op == "sample":
            result = ops.verify_sample(x, None, d)
        elif op == "fused":
            result = ops.fused_verify(x, d)
        elif op == "fused_sample":
            result = ops.fused_verify(x, d, do_sample=True, top_p=0.5)
        else:
            result = ops.process_logits(x, draft_tokens=d)
    except (ValueError, RuntimeError) as err:
        assert str(err).strip(), f"{op}: {type(err).__name__} without a message"
        return
    if op == "process":
        assert result.shape == x.shape and result.dtype == torch.float32
        if math.isfinite(value) and x.numel():
            torch.testing.assert_close(result.sum(-1), torch.ones(x.shape[:-1]))
        return
    out, num_accepted = result
    assert x.dim() == 3 and out.shape == (x.shape[0], x.shape[1]), "accepted input of the wrong rank"
    assert_invariants(out, num_accepted, d)
    assert bool((out < x.shape[-1]).all()), "a token outside the vocabulary"


# ----------------------------------------------------------------------------- bad input
def _inputs():
    logits, q, draft = make_case(2, 3, 20, seed=0)
    return logits, torch.softmax(logits, -1), q, draft


GREEDY_IMPLS = {"native": ops.verify_greedy, "reference": REF.verify_greedy}
SAMPLE_IMPLS = {"native": ops.verify_sample, "reference": REF.verify_sample}
FUSED_IMPLS = {"native": ops.fused_verify, "reference": REF.fused_verify}
BAD = pytest.raises


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_bad_inputs_verify_greedy(impl):
    f = GREEDY_IMPLS[impl]
    logits, _, _, draft = _inputs()
    with BAD((ValueError, RuntimeError), match="rank"):
        f(logits[0], draft)
    with BAD((ValueError, RuntimeError), match="draft_tokens"):
        f(logits, draft[:, :2])  # γ mismatch
    with BAD((ValueError, RuntimeError), match="draft_tokens"):
        f(logits, draft[:1])  # batch mismatch
    with BAD((ValueError, RuntimeError), match="outside"):
        f(logits, draft.clone().fill_(20))
    with BAD((ValueError, RuntimeError), match="outside"):
        f(logits, draft.clone().fill_(-1))
    with BAD((ValueError, RuntimeError), match="int"):
        f(logits, draft.float())
    with BAD((ValueError, RuntimeError), match="float"):
        f(logits.long(), draft)
    bad = logits.clone()
    bad[1, 0, 4] = float("nan")
    with BAD((ValueError, RuntimeError), match="NaN"):
        f(bad, draft)
    with BAD((ValueError, RuntimeError), match="device"):
        f(logits, draft.to("meta"))
    with BAD((ValueError, RuntimeError), match="Tensor"):
        f(logits.tolist(), draft)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_bad_inputs_verify_sample(impl):
    f = SAMPLE_IMPLS[impl]
    _, p, q, draft = _inputs()
    with BAD((ValueError, RuntimeError), match="draft_probs"):
        f(p, q[:, :2], draft)
    with BAD((ValueError, RuntimeError), match="draft_tokens"):
        f(p, q, draft[:, :2])
    with BAD((ValueError, RuntimeError), match="outside"):
        f(p, q, draft.clone().fill_(99))
    for name, tensor in (("target", p), ("draft", q)):
        for value, match in ((float("nan"), "NaN"), (float("inf"), "inf"), (-0.1, "negative")):
            bad = tensor.clone()
            bad[1, -1, 3] = value
            args = (bad, q) if name == "target" else (p, bad)
            with BAD((ValueError, RuntimeError), match=match):
                f(*args, draft)
        unnormalised = tensor * 1.1
        args = (unnormalised, q) if name == "target" else (p, unnormalised)
        with BAD((ValueError, RuntimeError), match="sum to 1"):
            f(*args, draft)
    with BAD((ValueError, RuntimeError), match="device"):
        f(p, q.to("meta"), draft)
    # non-contiguous inputs are handled, not refused
    pt = p.transpose(0, 1).contiguous().transpose(0, 1)
    assert not pt.is_contiguous()
    assert_same(f(pt, q, draft, generator=gen(0)), f(p, q, draft, generator=gen(0)))


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_bad_inputs_fused_verify(impl):
    f = FUSED_IMPLS[impl]
    logits, _, q, draft = _inputs()
    for kwargs, match in ((dict(do_sample=True, temperature=0.0), "temperature"),
                          (dict(do_sample=True, top_p=0.0), "top_p"),
                          (dict(do_sample=True, top_p=1.01), "top_p"),
                          (dict(do_sample=True, top_k=-2), "top_k"),
                          (dict(repetition_penalty=-1.0), "repetition_penalty"),
                          (dict(repetition_penalty=0.0), "repetition_penalty")):
        with BAD((ValueError, RuntimeError), match=match):
            f(logits, draft, **kwargs)
    with BAD((ValueError, RuntimeError), match="draft_probs"):
        f(logits, draft, q)  # q without sampling
    with BAD((ValueError, RuntimeError), match="draft_probs"):
        f(logits, draft, q[:, :1], do_sample=True)
    with BAD((ValueError, RuntimeError), match="prev_tokens"):
        f(logits, draft, prev_tokens=torch.zeros(5, 2, dtype=torch.long))
    bad_q = q.clone()
    bad_q[0, 0, draft[0, 0]] = float("nan")  # q_0(d_0) is always read
    with BAD((ValueError, RuntimeError), match="NaN"):
        f(logits, draft, bad_q, do_sample=True)
    bad = logits.clone()
    bad[:, 0, 2] = float("inf")
    with BAD((ValueError, RuntimeError), match=r"\+inf"):
        f(bad, draft, do_sample=True)
    with BAD((ValueError, RuntimeError), match="outside"):
        f(logits, draft.clone().fill_(20))


def test_fake_implementations_give_shapes():
    # torch.compile / export trace the native ops through their registered fake implementations
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(3, 5, 111)
        draft = torch.empty(3, 4, dtype=torch.long)
        out, n = torch.ops.fastspec.fused_verify(logits, draft, None, None, torch.empty(3, 5, dtype=torch.float64),
                                                 True, 1.0, 0, 1.0, 1.0)
        assert out.shape == (3, 5) and out.dtype == torch.long and n.shape == (3,)
        out, n = torch.ops.fastspec.verify_greedy(logits, draft)
        assert out.shape == (3, 5) and n.shape == (3,)
        probs = torch.ops.fastspec.process_logits(logits, None, None, True, 1.0, 0, 1.0, 1.0)
        assert probs.shape == (3, 5, 111) and probs.dtype == torch.float32


def test_float64_inputs_are_rounded_to_float32_once():
    # the kernels read float32; float64 inputs mean their float32 rounding, for native and reference alike
    logits, q, draft = make_case(3, 4, 111, seed=4)
    p64, q64 = torch.softmax(logits.double(), -1), q.double()
    a = ops.verify_sample(p64, q64, draft, generator=gen(0))
    assert_same(a, REF.verify_sample(p64, q64, draft, generator=gen(0)))
    assert_same(a, ops.verify_sample(p64.float(), q64.float(), draft, generator=gen(0)))
    f = ops.fused_verify(logits.double(), draft, q64, do_sample=True, top_p=0.9, generator=gen(1))
    assert_same(f, REF.fused_verify(logits.double(), draft, q64, do_sample=True, top_p=0.9, generator=gen(1)))
