"""Native verify ops vs their pure-torch reference twins (fastspec/ops.py), B=8, γ=5, V=32128.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_verify.py -s --benchmark-only

Each case first checks that native and reference return the same tokens, then times them in
interleaved rounds (reference, native, reference, native, ...) and reports the median of each and
the ratio; pytest-benchmark separately times the native call. The scenario: random target logits
(N(0, 2²)), a drafter whose logits are the target's plus N(0, 0.5²) noise, processed with the
same settings (its q), drafts sampled from q; prev_tokens are 64 earlier tokens.
"""
import statistics
import time

import pytest
import torch

from fastspec import ops

B, GAMMA, V = 8, 5, 32128
ROUNDS = 15

SAMPLING_CASES = {
    "sample: temperature only (full-vocab softmax)": dict(),
    "sample: HF defaults (top_k=50)": dict(top_k=50),
    "sample: top_p=0.9": dict(top_p=0.9),
    "sample: T=0.7, top_k=50, top_p=0.9, rep=1.2": dict(temperature=0.7, top_k=50, top_p=0.9,
                                                        repetition_penalty=1.2),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scenario(settings, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, GAMMA + 1, V, generator=g) * 2  # [B,γ+1,V]
    prev = torch.randint(0, V, (B, 64), generator=g)  # [B,L]
    q_logits = logits[:, :GAMMA] + 0.5 * torch.randn(B, GAMMA, V, generator=g)  # [B,γ,V]
    q = ops.process_logits(q_logits, prev_tokens=prev, **settings)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, GAMMA)
    return logits, prev, q, draft


def interleaved(reference, native, rounds=ROUNDS):
    reference(), native()  # warm-up
    t_ref, t_nat = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        reference()
        t_ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        native()
        t_nat.append(time.perf_counter() - t)
    ratios = sorted(r / n for r, n in zip(t_ref, t_nat))
    return statistics.median(t_ref), statistics.median(t_nat), statistics.median(ratios), ratios[0]


def report(benchmark, name, reference, native, accepted):
    t_ref, t_nat, ratio, worst = interleaved(reference, native)
    benchmark.extra_info.update(reference_ms=t_ref * 1e3, native_ms=t_nat * 1e3, ratio=ratio, worst_ratio=worst)
    print(f"\n| {name} | {t_ref * 1e3:.2f} ms | {t_nat * 1e3:.3f} ms | **{ratio:.1f}×** (worst round {worst:.1f}×) "
          f"| {accepted:.2f} |")
    benchmark.pedantic(native, rounds=10, warmup_rounds=1)
    return ratio


def test_fused_verify_greedy(benchmark):
    logits, prev, _, _ = scenario({})
    draft = logits[:, :GAMMA].argmax(-1)  # a good greedy drafter: accepted up to a mismatch
    draft[torch.arange(B), torch.arange(B) % GAMMA] = (draft[torch.arange(B), torch.arange(B) % GAMMA] + 1) % V
    native = lambda: ops.fused_verify(logits, draft, prev_tokens=prev)  # noqa: E731
    reference = lambda: ops.reference.fused_verify(logits, draft, prev_tokens=prev)  # noqa: E731
    out, n = native()
    ref_out, ref_n = reference()
    assert torch.equal(out, ref_out) and torch.equal(n, ref_n)
    ratio = report(benchmark, "fused greedy", reference, native, n.double().mean().item())
    assert ratio >= 5


def test_fused_verify_greedy_repetition_penalty(benchmark):
    logits, prev, _, _ = scenario({})
    draft = logits[:, :GAMMA].argmax(-1)
    draft[:, 3] = (draft[:, 3] + 1) % V
    kw = dict(prev_tokens=prev, repetition_penalty=1.2)
    native = lambda: ops.fused_verify(logits, draft, **kw)  # noqa: E731
    reference = lambda: ops.reference.fused_verify(logits, draft, **kw)  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(native(), reference()))
    report(benchmark, "fused greedy, repetition_penalty=1.2", reference, native, native()[1].double().mean().item())


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_fused_verify_sample(benchmark, case):
    settings = SAMPLING_CASES[case]
    logits, prev, q, draft = scenario(settings)
    kw = dict(prev_tokens=prev, do_sample=True, **settings)
    native = lambda: ops.fused_verify(logits, draft, q, generator=torch.Generator().manual_seed(1), **kw)  # noqa
    reference = lambda: ops.reference.fused_verify(logits, draft, q, generator=torch.Generator().manual_seed(1),  # noqa
                                                    **kw)
    out, n = native()
    ref_out, ref_n = reference()
    assert torch.equal(out, ref_out) and torch.equal(n, ref_n)
    ratio = report(benchmark, "fused " + case, reference, native, n.double().mean().item())
    assert ratio >= 5


def test_verify_greedy(benchmark):
    logits, _, _, _ = scenario({})
    draft = logits[:, :GAMMA].argmax(-1)
    draft[:, 2] = (draft[:, 2] + 1) % V
    native = lambda: ops.verify_greedy(logits, draft)  # noqa: E731
    reference = lambda: ops.reference.verify_greedy(logits, draft)  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(native(), reference()))
    report(benchmark, "verify_greedy (logits given)", reference, native, native()[1].double().mean().item())


def test_verify_sample(benchmark):
    logits, prev, q, draft = scenario({})
    p = ops.process_logits(logits, prev_tokens=prev, draft_tokens=draft)  # [B,γ+1,V]
    native = lambda: ops.verify_sample(p, q, draft, generator=torch.Generator().manual_seed(2))  # noqa: E731
    reference = lambda: ops.reference.verify_sample(p, q, draft, generator=torch.Generator().manual_seed(2))  # noqa
    assert all(torch.equal(a, b) for a, b in zip(native(), reference()))
    report(benchmark, "verify_sample (probs given, all rows validated)", reference, native,
           native()[1].double().mean().item())


def test_process_logits(benchmark):
    logits, prev, _, draft = scenario({})
    kw = dict(prev_tokens=prev, draft_tokens=draft, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2)
    native = lambda: ops.process_logits(logits, **kw)  # noqa: E731
    reference = lambda: ops.reference.process_logits(logits, **kw)  # noqa: E731
    torch.testing.assert_close(native(), reference(), rtol=1e-6, atol=1e-9)
    report(benchmark, "process_logits [8,6,32128], T=0.7, top_k=50, top_p=0.9, rep=1.2", reference, native,
           float("nan"))
