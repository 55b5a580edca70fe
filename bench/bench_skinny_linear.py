"""fastspec.ops.skinny_linear against BLAS (torch.nn.functional.linear: MKL here) at the few rows
of a verify forward, and what it does to r (a (γ+1)-token forward / a 1-token forward) on SmolLM2.

    python -m pytest bench/bench_skinny_linear.py -s --benchmark-only

1. Kernel: all 30 layers' linear shapes of SmolLM2-135M (q 576², k/v 192×576, o 576², gate/up
   1536×576, down 576×1536; random weights, 89 MB, so they stream from memory as in a real
   forward) and its 49152×576 head, for M = 1, 2, 5, 8, 12 rows; BLAS and kernel interleaved,
   medians of ROUNDS. Also native vs its PyTorch reference (same sums) on a small shape.
2. r per γ on SmolLM2 (real weights), fp32, forwards after a 150-token prompt: BLAS, the kernel,
   and the kernel + fastspec.grouped_attention (three copies, interleaved; bench_precision's method).
"""
import statistics

import pytest
import torch

from bench_drafters import _interleaved
from fastspec import ops
from fastspec.grouped_attention import grouped_attention
from fastspec.skinny_linear import skinny_linears

ROUNDS = 9
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def interleaved(calls, rounds=ROUNDS):
    """{name: median seconds} of each call (bench_drafters' round-robin after a warm-up round)."""
    return {name: statistics.median(ts) for name, ts in _interleaved(calls, rounds).items()}


@pytest.mark.skipif(not ops.native_available(), reason="fastspec._C not built")
def test_kernel_vs_blas_smollm2_shapes(benchmark):
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(n, k, generator=gen) for _ in range(30) for n, k in LAYER_SHAPES]
    head = torch.randn(49152, 576, generator=gen)
    lines = [f"\n### skinny_linear vs BLAS, SmolLM2-135M shapes ({torch.get_num_threads()} threads, median of {ROUNDS})",
             "| rows M | 30 layers BLAS ms | 30 layers skinny ms | ratio | head BLAS ms | head skinny ms | ratio |",
             "|---|---|---|---|---|---|---|"]
    info = {}
    for m in (1, 2, 5, 8, 12):
        xs = {576: torch.randn(m, 576, generator=gen), 1536: torch.randn(m, 1536, generator=gen)}
        for w in layers[:7] + [head]:  # the kernel is BLAS's equal to fp32 rounding
            torch.testing.assert_close(ops.skinny_linear(xs[w.shape[1]], w), torch.nn.functional.linear(xs[w.shape[1]], w),
                                       rtol=1e-4, atol=1e-4)
        t = interleaved({
            "blas": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in layers],
            "skinny": lambda: [ops.skinny_linear(xs[w.shape[1]], w) for w in layers],
            "head_blas": lambda: torch.nn.functional.linear(xs[576], head),
            "head_skinny": lambda: ops.skinny_linear(xs[576], head),
        })
        info[m] = {k: v * 1e3 for k, v in t.items()}
        lines.append(f"| {m} | {t['blas'] * 1e3:.1f} | {t['skinny'] * 1e3:.1f} | **{t['blas'] / t['skinny']:.2f}×** "
                     f"| {t['head_blas'] * 1e3:.1f} | {t['head_skinny'] * 1e3:.1f} | **{t['head_blas'] / t['head_skinny']:.2f}×** |")
    x, w = torch.randn(5, 577, generator=gen), torch.randn(111, 577, generator=gen)
    assert torch.equal(ops.skinny_linear(x, w), ops.reference.skinny_linear(x, w))
    t = interleaved({"reference": lambda: ops.reference.skinny_linear(x, w), "native": lambda: ops.skinny_linear(x, w)})
    lines.append(f"\nnative vs its PyTorch reference (M 5, K 577, N 111, equal bit for bit): "
                 f"{t['reference'] * 1e3:.2f} ms vs {t['native'] * 1e3:.3f} ms, **{t['reference'] / t['native']:.0f}×**")
    print("\n".join(lines))
    benchmark.extra_info["kernel"] = info
    benchmark.pedantic(lambda: [ops.skinny_linear(xs[w.shape[1]], w) for w in layers], rounds=3, iterations=1)


@pytest.mark.skipif(not ops.native_available(), reason="fastspec._C not built")
def test_r_per_gamma_smollm2_with_kernel(benchmark):
    from bench_precision import _forward_times, _table
    from fastspec.targets import load_smollm2

    blas, skinny, both = (load_smollm2(dtype=torch.float32)[0] for _ in range(3))
    prompt = torch.randint(100, 40000, (1, 150), generator=torch.Generator().manual_seed(0))
    # the first three re-concatenate the KV cache as transformers does; the last appends in place
    models = {"float32 BLAS": blas, "float32 skinny": skinny, "float32 skinny + grouped attention": both,
              "float32 skinny + grouped attention + in-place cache": both}
    concatenated = {name: False for name in list(models)[:3]}
    with skinny_linears(skinny) as swapped, skinny_linears(both), grouped_attention(both) as grouped:
        assert swapped > 200 and grouped
        medians = benchmark.pedantic(
            _forward_times, args=(models, lambda m: {"input_ids": prompt},
                                  lambda m, w: {"input_ids": prompt[:, :w],
                                                "position_ids": torch.arange(150, 150 + w)[None]}, concatenated),
            rounds=1, iterations=1)
    benchmark.extra_info["smollm2"] = _table(
        "SmolLM2-135M-Instruct fp32: BLAS, skinny_linear, + grouped attention, + in-place KV cache", medians)
