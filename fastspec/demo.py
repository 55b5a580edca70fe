"""``fastspec demo``: the whole product on an embedded default, offline, in minutes on a CPU.

Target: the real SmolLM2-135M-Instruct (GGUF dequantized once, cached as safetensors).
Data: aclsum (abstract -> summary). Steps, each with a progress bar:

1. the target writes a small pseudo-dataset (its own greedy summaries of training abstracts);
2. an n-gram drafter is fitted on it, and the prompt-lookup drafter is built;
3. a small LSTM drafter is KD-trained briefly (or loaded from the cache, trained the same way),
   and the EAGLE-style feature drafter is trained on the target's own features within a time budget
   (shown alone and as the fallback of prompt lookup: the hybrid);
4. held-out test prompts are decoded autoregressively and speculatively with each drafter and
   the ensemble, interleaved prompt by prompt (ratios measured in one run);
5. a table: α, τ, tokens/s, speedup vs autoregressive, ideal speedup, and whether the outputs
   were identical to autoregressive decoding (greedy: they must be; the exit status is 1 if not);
6. ``report.md``, ``results.json`` and PNG plots (per-position acceptance, speedup vs γ) in ``--out``.

The target runs in ``--dtype`` (default ``auto``: bf16 on a CPU with bf16 matrix units, else fp32);
in bf16 a greedy output may part from autoregressive decoding at a near-tie of the target, which the
table's agreement columns show and which is not a failure (any other divergence is).

FLAN-T5 users: ``fastspec demo --target google/flan-t5-xl --dataset cnn_dailymail:/path/to/copy``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from fastspec import introspect, precision, report, targets
from fastspec.data import load_examples
from fastspec.distill.feature import FeatureTrainConfig, train_feature_drafter
from fastspec.distill.pseudo import PseudoSettings, SourceRecord, generate_pseudo_dataset, load_pseudo_dataset
from fastspec.distill.trainer import TrainConfig, fit_ngram_drafter, stamp_training, train_drafter, training_metadata
from fastspec.drafters import EnsembleDrafter, LSTMDrafter, PromptLookupDrafter
from fastspec.drafters.feature import TRAINED_CONFIDENCE_THRESHOLD
from fastspec.errors import UserError
from fastspec.eval import AR_NAME, Decoder, compare, decode_texts, hf_generate_decoder, load_workload
from fastspec.targets import SMOLLM2

# Sizes of the two modes. The defaults keep the whole run <= 10 min (quick <= 3 min) on 2 CPU cores.
@dataclass(frozen=True)
class DemoSize:
    num_train: int  # training sources for the pseudo-dataset
    pseudo_max_new_tokens: int
    num_test: int  # held-out prompts decoded by every drafter
    max_new_tokens: int
    lstm_steps: int
    feature_budget_s: float  # wall-clock training budget of the feature drafter
    sweep_prompts: int  # prompts for the speedup-vs-γ sweep
    sweep_gammas: tuple


# γ ≤ 7: a verify block of ≤ 8 rows is the skinny kernel's single pass over the weights (fastspec.skinny_linear)
FULL = DemoSize(num_train=32, pseudo_max_new_tokens=64, num_test=5, max_new_tokens=64, lstm_steps=80,
                feature_budget_s=90.0, sweep_prompts=2, sweep_gammas=(1, 3, 5, 7))
QUICK = DemoSize(num_train=8, pseudo_max_new_tokens=32, num_test=2, max_new_tokens=32, lstm_steps=20,
                 feature_budget_s=45.0, sweep_prompts=1, sweep_gammas=(1, 3, 6))

HF_NAME = "HF generate"
PSEUDO_BATCH = 8
TOPK_LOGITS = 32  # teacher logits kept per token for KD (the rest of the mass is spread uniformly)
FEATURE_NAME, HYBRID_NAME = "feature (EAGLE)", "prompt lookup + feature"
# agreement with autoregressive decoding (the eval's rows carry them; shown when present)
AGREEMENT_COLUMNS = [report.Column("token_agreement", "token agreement", report.fmt_float(3)),
                     report.Column("first_divergence", "first divergence", lambda v: "–" if v is None else str(v)),
                     report.Column("divergence_near_tie", "at a near-tie", report.fmt_bool)]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``fastspec demo`` flags (the CLI calls this, then :func:`main`)."""
    parser.add_argument("--quick", action="store_true", help="few prompts, short outputs (<= 3 min on 2 CPU cores)")
    parser.add_argument("--target", default=SMOLLM2,
                        help="'smollm2' (offline default), a local HF folder or a hub name (e.g. google/flan-t5-xl)")
    parser.add_argument("--dataset", default="aclsum",
                        help="'aclsum[:section[:aspects]]' or 'cnn_dailymail:/path' (a local CNN/DailyMail copy)")
    parser.add_argument("--out", default="fastspec_demo", help="output folder (report.md, results.json, plots)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    parser.add_argument("--gamma", type=int, default=5, help="draft tokens per step (γ)")
    parser.add_argument("--num_train", type=int, default=None, help="pseudo-dataset sources (default by mode)")
    parser.add_argument("--num_test", type=int, default=None, help="held-out prompts (default by mode)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="tokens per test output (default by mode)")
    parser.add_argument("--lstm_steps", type=int, default=None, help="KD training steps of the LSTM drafter")
    parser.add_argument("--feature_budget_s", type=float, default=None,
                        help="training seconds of the feature drafter (default by mode; 0 = no feature drafter)")
    parser.add_argument("--dtype", default="auto", help="target dtype: auto (bf16 where the CPU has bf16 units, "
                        "else fp32), float32, bfloat16, float16")
    parser.add_argument("--max_source_length", type=int, default=384, help="truncate prompts to this many tokens")
    parser.add_argument("--ngram_n", type=int, default=4, help="n of the n-gram drafter")
    parser.add_argument("--no_cache", action="store_true", help="retrain the LSTM even if a cached one exists")
    parser.add_argument("--no_hf", action="store_true", help="skip the HF generate reference row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def _dataset_spec(spec: str) -> str:
    """``cnn_dailymail:/path`` -> the path understood by :func:`fastspec.data.load_examples`."""
    for prefix in ("cnn_dailymail:", "cnndm:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return spec


def _step(message: str) -> float:
    print(f"\n== {message}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str = "") -> None:
    print(f"   {what}({time.perf_counter() - start:.1f}s)", flush=True)


# --------------------------------------------------------------------------- steps


def make_pseudo_dataset(target, train_prompts: List[List[int]], ids: List[str], out_dir: str, size: DemoSize,
                        target_name: str, progress: bool) -> List[dict]:
    """Step 1: the target's own greedy outputs on training prompts, with its top-k logits cached
    for KD (resumable: a rerun with the same settings reuses ``out_dir``)."""
    sources = [SourceRecord(index=i, id=ids[i], source_ids=p) for i, p in enumerate(train_prompts)]
    settings = PseudoSettings(batch_size=PSEUDO_BATCH, max_new_tokens=size.pseudo_max_new_tokens, do_sample=False,
                              topk_logits=TOPK_LOGITS)
    path = generate_pseudo_dataset(target, sources, out_dir, settings, target_name=target_name, progress=progress)
    return load_pseudo_dataset(path)


def build_cheap_drafters(records: List[dict], vocab_size: int, ngram_n: int) -> Dict[str, Any]:
    """Step 2: n-gram fitted on the target's pseudo outputs (the seed's distilled n-gram), prompt
    lookup on the source, and prompt lookup falling back to the n-gram."""
    def ngram():
        return fit_ngram_drafter(records, vocab_size, ngram_n, use_references=False, use_outputs=True)

    return {
        "n-gram (pseudo)": ngram(),
        "prompt lookup": PromptLookupDrafter(),
        "prompt lookup + n-gram": PromptLookupDrafter(fallback=ngram()),
    }


def train_or_load_lstm(target, records: List[dict], pseudo_dir: str, size: DemoSize, cache_root: str, seed: int,
                       use_cache: bool, progress: bool):
    """Step 3: a small LSTM drafter KD-trained (forward KL against the target's cached top-k
    logits) on the pseudo-dataset; cached under ``cache_root``, keyed by its data and settings."""
    config = TrainConfig(drafter="lstm", loss=0.0, kd_loss=1.0, distill_method="fkl", kd_temp=1.0,
                         teacher_logits="cache", max_steps=size.lstm_steps, batch_size=4, lr=3e-3,
                         warmup_steps=min(10, size.lstm_steps // 5), seed=seed, ckpt_every=0)
    key = json.dumps([[[r["source_ids"], r["output_ids"]] for r in records], config.resume_key()], sort_keys=True)
    folder = os.path.join(cache_root, f"lstm-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    if use_cache and os.path.isfile(os.path.join(folder, "config.json")):
        try:
            return LSTMDrafter.load(folder), folder, True
        except ValueError as err:  # corrupted cache: retrain
            print(f"   cached LSTM unusable ({err}); retraining")
    drafter = train_drafter(target, records, config, progress=progress, pseudo_dir=pseudo_dir)
    tmp = f"{folder}.tmp{os.getpid()}"
    drafter.save(tmp)
    stamp_training(tmp, training_metadata(config, pseudo_dataset="fastspec demo"))
    if os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # atomic: a killed run never leaves a half-written cache entry
    return drafter, folder, False


def train_feature(target, records: List[dict], size: DemoSize, seed: int, dtype, progress: bool):
    """Step 3b: the EAGLE-style feature drafter on the pseudo-dataset (the target's own outputs),
    trained for ``size.feature_budget_s`` seconds, then run in the target's dtype."""
    pairs = [(r["source_ids"], r["output_ids"]) for r in records if r.get("output_ids")]
    # tuned for a short budget on a loaded 2-core CPU (aclsum, SmolLM2; before: batch 8, whole
    # sequences, lr 5e-4 with 20 warm-up steps -> 4 steps and 0.02 held-out step-1 agreement in 45 s;
    # these -> ~35 steps and 0.18): windows of 32 prompt positions + the output, small batches, a high
    # cosine-decayed lr with a short warm-up, one unrolled pass for the first 30% of the budget
    config = FeatureTrainConfig(max_steps=None, time_budget_s=size.feature_budget_s, batch_size=4, lr=2e-3,
                                warmup_steps=3, lr_schedule="cosine", unroll_ramp=0.3, context_window=32,
                                seed=seed, progress=progress)
    drafter = train_feature_drafter(target, pairs, config)
    drafter.confidence_threshold = TRAINED_CONFIDENCE_THRESHOLD  # as `fastspec train` saves it
    if dtype is not None:
        drafter.model.to(dtype)
    return drafter


def table_columns(rows: List[dict]) -> list:
    """The speculative columns, plus the agreement columns when the rows carry them."""
    extra = [c for c in AGREEMENT_COLUMNS if any(r.get(c.key) is not None for r in rows)]
    return list(report.SPEC_COLUMNS) + extra


# --------------------------------------------------------------------------- main


def main(args) -> int:
    """Run ``fastspec demo``; returns the exit status (1 when a greedy output differs from AR)."""
    t_start = time.perf_counter()
    base = QUICK if args.quick else FULL
    size = DemoSize(
        num_train=args.num_train or base.num_train,
        pseudo_max_new_tokens=base.pseudo_max_new_tokens,
        num_test=args.num_test or base.num_test,
        max_new_tokens=args.max_new_tokens or base.max_new_tokens,
        lstm_steps=base.lstm_steps if args.lstm_steps is None else args.lstm_steps,
        feature_budget_s=base.feature_budget_s if args.feature_budget_s is None else args.feature_budget_s,
        sweep_prompts=base.sweep_prompts,
        sweep_gammas=base.sweep_gammas,
    )
    if min(size.num_train, size.num_test, size.max_new_tokens, args.gamma) < 1:
        raise UserError("--gamma, --num_train, --num_test and --max_new_tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    t = _step(f"loading the target ({args.target})")
    data_spec = _dataset_spec(args.dataset)
    dtype = precision.resolve_dtype(args.dtype, args.device, announce=True)
    work = load_workload(args.target, args.device, data_spec, "test", size.num_test, args.max_source_length,
                         dtype=dtype)
    target, tokenizer, test_examples, test_prompts = work.target, work.tokenizer, work.examples, work.prompts
    vocab_size = introspect.vocab_size(target)
    dtype_name = str(next(target.parameters()).dtype).replace("torch.", "")
    _done(t, f"{sum(p.numel() for p in target.parameters()) / 1e6:.0f}M parameters, vocab {vocab_size}, {dtype_name} ")

    train_examples = load_examples(data_spec, split="train", limit=size.num_train)
    train_prompts = work.encode([e.source for e in train_examples])

    t = _step(f"1/6 pseudo-dataset: the target summarizes {len(train_prompts)} training sources")
    records = make_pseudo_dataset(target, train_prompts, [e.id for e in train_examples],
                                  os.path.join(args.out, "pseudo"), size, args.target, progress)
    _done(t, f"{sum(len(r['output_ids']) for r in records)} target tokens ")

    t = _step("2/6 n-gram drafter (fitted on the pseudo-dataset) and prompt-lookup drafter")
    drafters = build_cheap_drafters(records, vocab_size, args.ngram_n)
    _done(t)

    t = _step(f"3/6 LSTM drafter, KD-trained on the pseudo-dataset ({size.lstm_steps} steps)")
    cache_root = os.path.join(str(targets.cache_dir()), "demo", _safe_name(args.target))
    lstm, lstm_folder, from_cache = train_or_load_lstm(target, records, os.path.join(args.out, "pseudo"), size,
                                                       cache_root, args.seed, not args.no_cache, progress)
    drafters["LSTM (KD)"] = lstm
    _done(t, f"{'loaded from ' + lstm_folder if from_cache else 'saved to ' + lstm_folder} ")

    drafters["ensemble"] = EnsembleDrafter(list(drafters.values()), names=list(drafters))

    feature_note = "off (--feature_budget_s 0)"
    if size.feature_budget_s > 0:
        t = _step(f"3b/6 feature drafter (EAGLE-style), trained on the target's features for {size.feature_budget_s:.0f}s")
        feature = train_feature(target, records, size, args.seed, dtype, progress)
        drafters[FEATURE_NAME] = feature
        drafters[HYBRID_NAME] = PromptLookupDrafter(fallback=feature)
        stats = feature.train_stats
        feature_note = (f"{stats['steps']} steps in {stats['seconds']:.0f}s on {stats['data'].get('tokens', 0)} tokens, "
                        f"shortlist {stats['shortlist_size']}, final loss {stats['final_loss']:.3f}")
        _done(t, feature_note + " ")

    t = _step(f"4/6 decoding {len(test_prompts)} held-out prompts: autoregressive, HF, each drafter, ensemble")
    decoders = [hf_generate_decoder(target, HF_NAME)] if not args.no_hf else []
    decoders += [Decoder(name, d, args.gamma) for name, d in drafters.items()]
    main_run = compare(target, decoders, test_prompts, max_new_tokens=size.max_new_tokens, gamma=args.gamma,
                       generate_kwargs={"do_sample": False}, progress=progress, desc="decode")
    rows = main_run.rows
    _done(t)

    spec_rows = [r for r in rows if r["gamma"]]
    best = max(spec_rows, key=lambda r: r["speedup"])
    t = _step(f"   speedup vs γ for the best drafter ({best['name']}) on {size.sweep_prompts} prompts")
    sweep_decoders = [Decoder(f"γ={g}", drafters[best["name"]], g) for g in size.sweep_gammas]
    sweep = compare(target, sweep_decoders, test_prompts[: size.sweep_prompts], max_new_tokens=size.max_new_tokens,
                    gamma=args.gamma, generate_kwargs={"do_sample": False}, progress=progress, desc="γ sweep")
    sweep_rows = sweep.rows[1:]
    _done(t)

    t = _step("5/6 results")
    print(report.text_table(rows, table_columns(rows)), flush=True)
    bad = main_run.mismatches() + sweep.mismatches()

    _step("6/6 report and plots")
    settings = {
        "target": args.target, "dataset": args.dataset, "mode": "quick" if args.quick else "full",
        "pseudo-dataset": f"{len(records)} target outputs (greedy, ≤ {size.pseudo_max_new_tokens} tokens)",
        "test prompts": len(test_prompts), "max_new_tokens": size.max_new_tokens, "gamma": args.gamma,
        "n-gram n": args.ngram_n, "LSTM": f"{size.lstm_steps} KD steps (fkl){' — loaded from cache' if from_cache else ''}",
        "feature drafter": feature_note, "dtype": dtype_name,
        "device": args.device, "torch threads": torch.get_num_threads(),
    }
    files = write_demo_report(args.out, rows, sweep_rows, best["name"], settings, test_examples, main_run.runs, tokenizer)
    print(f"   report: {files['markdown']}\n   plots:  {files['per_position']}, {files['speedup_vs_gamma']}")
    print(f"\nfinished in {time.perf_counter() - t_start:.0f}s")
    if bad:
        print(f"ERROR: greedy outputs differ from autoregressive decoding for: {', '.join(bad)}")
        return 1
    if any(r.get("identical") is False for r in rows + sweep_rows):
        print(f"greedy outputs part from autoregressive decoding only at near-ties of the {dtype_name} target (lossless)")
    else:
        print("all greedy outputs are identical to autoregressive decoding (lossless)")
    return 0


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def write_demo_report(out_dir, rows, sweep_rows, best_name, settings, test_examples, runs, tokenizer) -> Dict[str, str]:
    spec_rows = [r for r in rows if r["gamma"]]
    files = {
        "per_position": report.plot_per_position_acceptance(
            {r["name"]: r["per_position_acceptance"] for r in spec_rows}, os.path.join(out_dir, "per_position_acceptance.png")),
        "speedup_vs_gamma": report.plot_speedup_vs_gamma(
            {best_name: {r["gamma"]: r["speedup"] for r in sweep_rows}}, os.path.join(out_dir, "speedup_vs_gamma.png"),
            ideal={best_name: {r["gamma"]: r["ideal_speedup"] for r in sweep_rows if r.get("ideal_speedup")}}),
        "json": report.write_json({"settings": settings, "rows": rows, "gamma_sweep": {"drafter": best_name, "rows": sweep_rows}},
                                  os.path.join(out_dir, "results.json")),
    }
    sweep_columns = [c for c in report.SPEC_COLUMNS if c.key != "name"]
    example_text = ""
    if test_examples:
        ar_text = decode_texts(tokenizer, runs[AR_NAME].outputs[:1])[0]
        example_text = (f"**Source** ({test_examples[0].id}): {test_examples[0].source[:600]}…\n\n"
                        f"**Target's summary** (identical for every drafter): {ar_text}")
    sections = [
        ("Settings", report.summarize_settings(settings)),
        ("Results", report.markdown_table(rows, table_columns(rows))
         + "\n\nα = accepted / drafted tokens, τ = tokens per target call, speedup = tokens/s over autoregressive "
           "decoding in the same engine (same run, interleaved per prompt), ideal = Leviathan et al. from α, γ and "
           "the measured drafter cost c."),
        (f"Speedup vs γ ({best_name})", report.markdown_table(sweep_rows, sweep_columns)),
        ("Plots", "![per-position acceptance](per_position_acceptance.png)\n\n![speedup vs gamma](speedup_vs_gamma.png)"),
        ("Example", example_text),
    ]
    files["markdown"] = report.write_markdown(os.path.join(out_dir, "report.md"), "fastspec demo", sections)
    return files
