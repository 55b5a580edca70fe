"""Precision benchmarks: r = cost of a (γ+1)-token verification forward / a 1-token forward, for
γ = 1..8, per dtype, on SmolLM2-135M (real weights) and a FLAN-T5-base-shaped target (random weights).

r caps every speedup: at α = 1 the best possible speedup is (γ+1)/(γc + r). In fp32 on a CPU r grows
with γ; in bf16 on a CPU with bf16 matrix units (AMX/AVX512-BF16) it stays near 1, as on a GPU.
Forwards of all widths and dtypes are interleaved on the same cached prefix; medians of REPEATS.

Run:  OMP_NUM_THREADS=1 python -m pytest bench/bench_precision.py -q -s --benchmark-only
Env:  FASTSPEC_BENCH_REPEATS (default 7), FASTSPEC_BENCH_DTYPES (default "float32,bfloat16"),
      FASTSPEC_BENCH_LAYERS (FLAN-T5-base-shaped layers, default 12).
"""
import os
import statistics
import time

import torch

from fastspec import precision
from shapes import FLAN_T5_BASE, t5_shaped

from fastspec.cache import cache_kwarg, cache_length, crop_cache, new_cache

REPEATS = int(os.environ.get("FASTSPEC_BENCH_REPEATS", "7"))
DTYPES = [precision.resolve_dtype(d) for d in os.environ.get("FASTSPEC_BENCH_DTYPES", "float32,bfloat16").split(",")]
LAYERS = int(os.environ.get("FASTSPEC_BENCH_LAYERS", "12"))
WIDTHS = list(range(1, 10))  # γ + 1 for γ = 0..8


def _forward_times(models, prefix_kwargs, step_kwargs, inplace_cache=None):
    """{dtype: {width: median seconds}} of one forward of `width` new tokens after a cached prefix.
    prefix_kwargs(model) -> kwargs that fill the cache; step_kwargs(model, width) -> kwargs of one step;
    inplace_cache: {key of models: False} for transformers' re-concatenating cache (default: the engine's)."""
    caches = {}
    with torch.no_grad():
        for dtype, model in models.items():
            caches[dtype] = new_cache(model, (inplace_cache or {}).get(dtype, True))
            model(**prefix_kwargs(model), **{cache_kwarg(model): caches[dtype]}, use_cache=True)
        base = {dtype: cache_length(cache) for dtype, cache in caches.items()}
        times = {dtype: {w: [] for w in WIDTHS} for dtype in models}
        for repeat in range(REPEATS + 1):  # the first round is a warm-up
            for width in WIDTHS:
                for dtype, model in models.items():
                    start = time.perf_counter()
                    model(**step_kwargs(model, width), **{cache_kwarg(model): caches[dtype]}, use_cache=True)
                    elapsed = time.perf_counter() - start
                    crop_cache(caches[dtype], base[dtype])
                    if repeat:
                        times[dtype][width].append(elapsed)
    return {dtype: {w: statistics.median(ts) for w, ts in by_width.items()} for dtype, by_width in times.items()}


def _table(name, medians):
    lines = [f"\n### r per γ, {name} (median of {REPEATS}, {torch.get_num_threads()} thread(s))",
             "| dtype | 1-token step ms | " + " | ".join(f"r γ={w - 1}" for w in WIDTHS[1:]) + " |",
             "|---|---|" + "---|" * (len(WIDTHS) - 1)]
    rows = {}
    for dtype, by_width in medians.items():
        r = {w - 1: by_width[w] / by_width[1] for w in WIDTHS[1:]}
        rows[str(dtype).replace("torch.", "")] = {"step_ms": 1e3 * by_width[1], "r": r}
        lines.append(f"| {str(dtype).replace('torch.', '')} | {1e3 * by_width[1]:.1f} | "
                     + " | ".join(f"{v:.2f}" for v in r.values()) + " |")
    print("\n".join(lines))
    return rows


def test_r_per_gamma_smollm2(benchmark):
    from fastspec.targets import load_smollm2

    models = {dtype: load_smollm2(dtype=dtype)[0] for dtype in DTYPES}  # one copy per dtype (Module.to is in place)
    prompt = torch.randint(100, 40000, (1, 150), generator=torch.Generator().manual_seed(0))
    medians = benchmark.pedantic(
        _forward_times, args=(models, lambda m: {"input_ids": prompt},
                              lambda m, w: {"input_ids": prompt[:, :w],
                                            "position_ids": torch.arange(150, 150 + w)[None]}),
        rounds=1, iterations=1)
    benchmark.extra_info["smollm2"] = _table("SmolLM2-135M-Instruct, KV cache after a 150-token prompt", medians)
    for by_width in medians.values():
        assert all(t > 0 for t in by_width.values())


def _t5_base_shaped(dtype):
    return t5_shaped(**dict(FLAN_T5_BASE, layers=LAYERS), dtype=dtype, fast_init=True)


def test_r_per_gamma_flan_t5_base_shaped(benchmark):
    models = {dtype: _t5_base_shaped(dtype) for dtype in DTYPES}
    source = torch.randint(3, 32000, (1, 200), generator=torch.Generator().manual_seed(0))
    decoded = torch.randint(3, 32000, (1, 29), generator=torch.Generator().manual_seed(1))
    encoded = {}
    with torch.no_grad():
        for dtype, model in models.items():
            encoded[dtype] = model.get_encoder()(input_ids=source, return_dict=True)

    def prefix(model):
        return {"encoder_outputs": encoded[next(model.parameters()).dtype], "decoder_input_ids": decoded[:, :20]}

    def step(model, width):
        return {"encoder_outputs": encoded[next(model.parameters()).dtype], "decoder_input_ids": decoded[:, 20:20 + width]}

    medians = benchmark.pedantic(_forward_times, args=(models, prefix, step), rounds=1, iterations=1)
    benchmark.extra_info["flan_t5_base_shaped"] = _table(
        f"FLAN-T5-base-shaped ({LAYERS}+{LAYERS} layers, d_model 768), 200-token source, 20 decoder tokens cached",
        medians)
    for by_width in medians.values():
        assert all(t > 0 for t in by_width.values())
