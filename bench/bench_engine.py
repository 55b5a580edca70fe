"""Engine benchmarks (CPU-friendly), ratios measured in one run with A/B interleaved.

1. Engine overhead: oracle drafter (α = 1) on a FLAN-T5-base-shaped target (random weights):
   non-model time per step as a share of the target forward time (goal ≤ 10%), and measured
   speedup over autoregressive (same engine) vs the ideal (γ+1)/(γc+1) (goal ≥ 0.85).
2. fastspec autoregressive (drafter=None) vs HF generate(), greedy, 64 new tokens (goal ≥ 1.0).
3. Offline α replay vs the engine on SmolLM2 fp32 (prompt lookup, aclsum, 64 new tokens): goal ≥ 20×.

Run:  OMP_NUM_THREADS=1 python -m pytest bench/bench_engine.py -q -s --benchmark-disable-gc
On a GPU set FASTSPEC_SYNC_TIMING=1, so per-forward times wait for the device.
Env:  FASTSPEC_BENCH_LAYERS (default 4; 12 is FLAN-T5-base), FASTSPEC_BENCH_REPEATS (default 3), FASTSPEC_BENCH_GAMMA (5).
"""
import os
import statistics
import time

import pytest
import torch

from shapes import FLAN_T5_BASE, t5_shaped

import fastspec
from fastspec.drafters import OracleDrafter

LAYERS = int(os.environ.get("FASTSPEC_BENCH_LAYERS", "4"))  # 12 = FLAN-T5-base; 4 keeps a 2-core CPU run short
REPEATS = int(os.environ.get("FASTSPEC_BENCH_REPEATS", "3"))
GAMMA = int(os.environ.get("FASTSPEC_BENCH_GAMMA", "5"))
NEW_TOKENS = 64
TEXT = (
    "summarize: Speculative decoding accelerates autoregressive generation by letting a cheap drafter "
    "propose several tokens that the large target model verifies in a single forward pass. The output "
    "distribution is provably unchanged, so the method is lossless, and the speedup depends on how often "
    "the target accepts the drafted tokens and on how cheap the drafter is compared with the target."
)


@pytest.fixture(scope="module")
def t5_base_shaped():
    from fastspec.targets import load_t5_tokenizer

    model = t5_shaped(**dict(FLAN_T5_BASE, layers=LAYERS))
    enc = load_t5_tokenizer()(TEXT, return_tensors="pt")
    return model, enc["input_ids"], enc["attention_mask"]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _engine_figures(model, ids, mask):
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    reference = fastspec.generate(model, None, ids, mask, **kwargs).sequences  # warm-up + oracle text
    assert reference.shape[1] == 1 + NEW_TOKENS
    continuation = [reference[0, 1:].tolist()]
    ar_times, spec_times, overhead_shares, ideal, alphas, cost_ratios, adjusted = [], [], [], [], [], [], []
    for _ in range(REPEATS):  # A/B interleaved
        t_ar, ar = _timed(lambda: fastspec.generate(model, None, ids, mask, **kwargs))
        t_spec, spec = _timed(
            lambda: fastspec.generate(model, OracleDrafter(continuation), ids, mask, gamma=GAMMA, **kwargs)
        )
        assert torch.equal(spec.sequences, reference) and torch.equal(ar.sequences, reference)
        m = spec.metrics
        ar_times.append(t_ar)
        spec_times.append(t_spec)
        # non-model time per step / target forward time per step
        # per decode step: the loop's own time / one verification forward (encoder call excluded)
        overhead_shares.append((m.engine_time_s / m.num_steps) / (m.verify_time_s / m.verify_calls))
        ideal.append(m.ideal_speedup)
        alphas.append(m.acceptance_rate)
        # r: one (γ+1)-token verification forward / one 1-token AR forward. The ideal formula assumes
        # r = 1 (memory-bound GPU); on a CPU the wider forward costs more, so also report the ideal
        # with the measured r: (γ+1) / (γc + r) at α = 1.
        r = (m.verify_time_s / m.verify_calls) / (ar.metrics.verify_time_s / ar.metrics.verify_calls)
        cost_ratios.append(r)
        adjusted.append((GAMMA + 1) / (GAMMA * m.c + r))
    speedup = statistics.median(a / s for a, s in zip(ar_times, spec_times))
    return dict(
        layers=LAYERS, gamma=GAMMA, alpha=statistics.median(alphas),
        ar_s=statistics.median(ar_times), spec_s=statistics.median(spec_times),
        overhead_share=statistics.median(overhead_shares), speedup=speedup,
        ideal_speedup=statistics.median(ideal), speedup_vs_ideal=speedup / statistics.median(ideal),
        verify_over_ar_forward=statistics.median(cost_ratios),
        speedup_vs_cost_adjusted_ideal=speedup / statistics.median(adjusted),
    )


def _ar_vs_hf(model, ids, mask):
    hf_kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf_ref = model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)  # warm-up
    ours_ref = fastspec.generate(model, None, ids, mask, **kwargs)
    assert hf_ref.shape == ours_ref.sequences.shape
    hf_times, ours_times = [], []
    for _ in range(REPEATS):
        with torch.no_grad():
            t_hf, _ = _timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs))
        t_ours, _ = _timed(lambda: fastspec.generate(model, None, ids, mask, **kwargs))
        hf_times.append(t_hf)
        ours_times.append(t_ours)
    return dict(
        hf_s=statistics.median(hf_times), fastspec_ar_s=statistics.median(ours_times),
        ratio_hf_over_fastspec=statistics.median(h / o for h, o in zip(hf_times, ours_times)),
    )


def test_engine_overhead_oracle(benchmark, t5_base_shaped):
    figures = benchmark.pedantic(lambda: _engine_figures(*t5_base_shaped), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print("\nengine overhead:", {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})


def test_fastspec_ar_vs_hf_generate(benchmark, t5_base_shaped):
    figures = benchmark.pedantic(lambda: _ar_vs_hf(*t5_base_shaped), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print("\nAR vs HF:", {k: round(v, 4) for k, v in figures.items()})


def _ragged_batch(model, ids, mask):
    """B=8 with ragged acceptance (noisy oracle, each draft token wrong with p=0.2): speculative vs
    autoregressive in the same engine, outputs checked equal."""
    from fastspec.targets import load_t5_tokenizer

    texts = [TEXT[: 60 + 45 * i] for i in range(8)]
    enc = load_t5_tokenizer()(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    kwargs = dict(max_new_tokens=32, eos_token_id=None, pad_token_id=0)
    reference = fastspec.generate(model, None, ids, mask, **kwargs).sequences
    conts = [row[1:].tolist() for row in reference]
    ar_times, spec_times, alphas, taus = [], [], [], []
    for _ in range(REPEATS):
        t_ar, _ = _timed(lambda: fastspec.generate(model, None, ids, mask, **kwargs))
        t_spec, spec = _timed(lambda: fastspec.generate(
            model, OracleDrafter(conts, noise=0.2, noise_seed=1), ids, mask, gamma=GAMMA, **kwargs))
        assert torch.equal(spec.sequences, reference)
        ar_times.append(t_ar)
        spec_times.append(t_spec)
        alphas.append(spec.metrics.acceptance_rate)
        taus.append(spec.metrics.mean_accepted_length)
    return dict(
        batch=8, alpha=statistics.median(alphas), tau=statistics.median(taus),
        ar_s=statistics.median(ar_times), spec_s=statistics.median(spec_times),
        speedup=statistics.median(a / s for a, s in zip(ar_times, spec_times)),
    )


def test_ragged_batch_speculative_vs_ar(benchmark, t5_base_shaped):
    figures = benchmark.pedantic(lambda: _ragged_batch(*t5_base_shaped), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print("\nragged batch:", {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})


def _replay_vs_engine(num_prompts: int = 4, new_tokens: int = 64):
    """SmolLM2-135M fp32, aclsum abstracts (chat prompts), prompt lookup γ=GAMMA, batch 1: the engine's
    time vs offline replay's (fastspec.distill.replay.replay_runs) over the engine's own outputs; the
    replayed metrics must equal the engine's."""
    from fastspec.data import load_examples
    from fastspec.data.prompts import encode_prompts
    from fastspec.distill.replay import replay_runs
    from fastspec.drafters import PromptLookupDrafter
    from fastspec.metrics import GenerationMetrics
    from fastspec.targets import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    sources = [e.source for e in load_examples("aclsum", "test", limit=num_prompts)]
    prompts = encode_prompts(tokenizer, model, sources)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False)
    engine, outputs, engine_s = GenerationMetrics(), [], 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        elapsed, out = _timed(lambda: fastspec.generate(model, PromptLookupDrafter(), ids, gamma=GAMMA, **kwargs))
        engine_s += elapsed
        engine += out.metrics
        new = out.sequences[0, len(prompt):].tolist()
        eos = set(fastspec.introspect.eos_token_ids(model))
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        outputs.append(new[:cut])
    replay_s, merged = _timed(lambda: replay_runs(model, {"pl": PromptLookupDrafter()}, prompts, outputs,
                                                  gamma=GAMMA, **kwargs))
    for name in ("num_steps", "row_steps", "num_accepted_tokens", "position_hits", "position_trials"):
        assert getattr(merged["pl"], name) == getattr(engine, name), name
    return dict(prompts=len(prompts), alpha=engine.acceptance_rate, tau=engine.mean_accepted_length,
                engine_s=engine_s, replay_s=replay_s, replay_speedup=engine_s / replay_s)


def test_replay_vs_engine_smollm2(benchmark):
    """Goal: replay ≥ 20× faster than the engine, with equal α, τ and per-position acceptance."""
    from fastspec.targets import smollm2_folder

    if not os.path.exists(str(smollm2_folder())):
        pytest.skip("SmolLM2 is not in the offline cache")
    figures = benchmark.pedantic(_replay_vs_engine, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print("\nreplay vs engine:", {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
