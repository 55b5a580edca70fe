"""Throughput of the distillation data modes on the real SmolLM2-135M-Instruct target and aclsum.

How many training tokens per second each way of making distillation data yields, all through
the functions training uses (nothing re-implemented here):

1. teacher-forced: the target's top-k logits over text that already exists, no generation
   (``fastspec.distill.pseudo._save_topk_logits``: ``teacher.teacher_forced_logits`` + top-k +
   logsumexp + the safetensors file, as ``fastspec pseudo --topk_logits`` writes it), over
   - ``refs``:    the aclsum train prompts (chat template) + their reference summaries;
                  scored = the reference tokens (the positions the KD loss uses);
   - ``sources``: the prompts themselves, (p[:1], p[1:]) as ``--feature_data sources`` does;
   - ``papers``:  the 250 unlabeled full papers (``aclsum_papers``), each cut to --paper_tokens;
   and the feature drafter's data (``feature_data.extract_features``: features at the default
   layers, last hidden state, top-k logits) over the prompt + reference pairs.
2. pseudo-dataset: the target's own greedy outputs, batched with the KV cache
   (``pseudo.generate_pseudo_dataset``, which calls ``fastspec.generate``), per batch size, fp32;
   with --bf16_batch_sizes also bf16 (emulated on CPUs without bf16 units: the table says which);
   with --topk_cache also fp32 batch 8 + the top-k logits cache (``PseudoSettings.topk_logits``).
   Scored = generated tokens (up to and including EOS).
3. on-policy: what ``TrainConfig(distill_method="on_policy")`` does per step (trainer._loss):
   ``student.sample`` from a fresh CNN / LSTM student (``students.build_student``), then
   ``teacher_forced_logits`` of the target over the samples. Scored = sampled tokens.
   (A fresh student samples near-uniform tokens, so rows rarely stop at EOS.)

tokens/s = scored tokens / wall seconds of the whole call (prompt forward included).
"forwarded" counts every non-pad token the target ran over. The last column is each row's
tokens/s over the pseudo-dataset's at fp32 batch 8 (median of the per-round ratios).
All rows run once per round, in turn (interleaved), after one small warm-up of each kind.

Run from the repository root with fastspec installed (pip install -e, or PYTHONPATH=.):
    OMP_NUM_THREADS=1 python bench/bench_data.py      # defaults: 8 prompts, 32 new tokens, batch 1,4,8, CNN
    # (measured: 6.8 min at 1 thread with the LSTM row too, while the 2 cores ran ≈ 5 other jobs)
    # the full set: batch 16, papers, bf16, the top-k cache (26 min at 1 thread on 2 busy cores):
    OMP_NUM_THREADS=1 python bench/bench_data.py --prompts 16 --batch_sizes 1,4,8,16 --papers 4 \
        --op_drafters cnn,lstm \
        --bf16_batch_sizes 8 --topk_cache --json out.json --markdown out.md
    python bench/bench_data.py --prompts 32 --new_tokens 64 --batch_sizes 1,4,8,16,32 --rounds 3 --threads 2
pytest (same defaults; extra flags in FASTSPEC_BENCH_DATA_ARGS="--prompts 8 ..."):
    python -m pytest bench/bench_data.py -s --benchmark-only
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastspec import introspect, report
from fastspec.data import encode_prompts, encode_references, load_examples
from fastspec.distill.feature_data import extract_features, reference_pairs
from fastspec.distill.pseudo import (PseudoSettings, SourceRecord, _save_topk_logits, generate_pseudo_dataset,
                                     load_pseudo_dataset)
from fastspec.distill.students import build_student
from fastspec.distill.teacher import teacher_forced_logits
from fastspec.distill.trainer import TrainConfig
from fastspec.precision import cpu_has_bf16_units
from fastspec.targets import load_target_and_tokenizer

BASELINE = "pseudo fp32 b=8"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="aclsum train examples (default 8; 16 for batch 16)")
    p.add_argument("--new_tokens", type=int, default=32, help="max new tokens per pseudo-dataset row (default 32)")
    p.add_argument("--batch_sizes", default="1,4,8", help="pseudo-dataset batch sizes, fp32 (default 1,4,8)")
    p.add_argument("--bf16_batch_sizes", default="", help="pseudo-dataset batch sizes in bf16, e.g. 8 (default: none; "
                   "emulated and ≈ 4× slower than fp32 on CPUs without bf16 units)")
    p.add_argument("--tf_batch", type=int, default=8, help="teacher-forced / feature batch size (default 8)")
    p.add_argument("--topk", type=int, default=32, help="top-k logits kept (default 32)")
    p.add_argument("--max_source_length", type=int, default=512, help="prompt token limit (default 512)")
    p.add_argument("--max_target_length", type=int, default=128, help="reference token limit (default 128)")
    p.add_argument("--papers", type=int, default=2, help="aclsum_papers rows teacher-forced; 0 skips (default 2)")
    p.add_argument("--paper_tokens", type=int, default=512, help="tokens per paper row (default 512)")
    p.add_argument("--op_drafters", default="cnn", help="on-policy students, e.g. cnn,lstm; '' skips (default cnn)")
    p.add_argument("--op_new_tokens", type=int, default=TrainConfig().on_policy_max_new_tokens,
                   help="on-policy samples per row (default: TrainConfig's, %(default)s)")
    p.add_argument("--op_batch", type=int, default=TrainConfig().batch_size,
                   help="on-policy rows per step (default: TrainConfig's, %(default)s)")
    p.add_argument("--no_features", action="store_true", help="skip the feature-drafter extraction row")
    p.add_argument("--topk_cache", action="store_true", help="add pseudo fp32 b=8 with the top-k logits cache")
    p.add_argument("--rounds", type=int, default=1, help="measured rounds, medians reported (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows + settings here")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    return p.parse_args(argv)


def _sizes(text: str) -> List[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _batches(rows: Sequence, size: int):
    return [rows[i:i + size] for i in range(0, len(rows), size)]


# ---------------------------------------------------------------------------- the modes
# Each returns run(n, short) -> {"scored", "forwarded", "rows"} over the first n rows;
# short=True (the warm-up) caps generation/sampling at 4 tokens.


def teacher_forced_mode(model, prompts, outputs, batch: int, topk: int, workdir: str) -> Callable:
    """_save_topk_logits per batch: teacher_forced_logits + top-k + logsumexp + the safetensors cache."""
    device = introspect.model_device(model)

    def run(n: int, short: bool = False) -> dict:
        scored = forwarded = 0
        records = [SourceRecord(i, str(i), list(p)) for i, p in enumerate(prompts[:n])]
        for b, (recs, outs) in enumerate(zip(_batches(records, batch), _batches(outputs[:n], batch))):
            _save_topk_logits(os.path.join(workdir, f"tf-{b}.safetensors"), model, recs, list(outs), topk, device)
            scored += sum(len(o) for o in outs)
            forwarded += sum(len(r.source_ids) + len(o) for r, o in zip(recs, outs))
        return {"scored": scored, "forwarded": forwarded, "rows": n}

    return run


def features_mode(model, pairs, batch: int, topk: int, max_length: int) -> Callable:
    """extract_features over (prompt, reference) pairs (the feature drafter's --feature_data references)."""

    def run(n: int, short: bool = False) -> dict:
        data = extract_features(model, pairs[:n], topk=topk, batch_size=batch, max_length=max_length, progress=False)
        return {"scored": sum(len(o) for _, o in pairs[:n]), "forwarded": data.num_tokens, "rows": n}

    return run


def pseudo_mode(model, prompts, batch: int, new_tokens: int, topk: int, workdir: str) -> Callable:
    """generate_pseudo_dataset (greedy) into a fresh folder; scored = generated tokens up to EOS."""

    def run(n: int, short: bool = False) -> dict:
        out = tempfile.mkdtemp(prefix="pseudo-", dir=workdir)  # a fresh folder: nothing to resume
        sources = [SourceRecord(i, str(i), list(p)) for i, p in enumerate(prompts[:n])]
        settings = PseudoSettings(batch_size=batch, max_new_tokens=4 if short else new_tokens, topk_logits=topk)
        records = load_pseudo_dataset(generate_pseudo_dataset(model, sources, out, settings, progress=False))
        generated = sum(len(r["output_ids"]) for r in records)
        forwarded = sum(len(r["source_ids"]) for r in records) + generated
        return {"scored": generated, "forwarded": forwarded, "rows": n}

    return run


def on_policy_mode(model, prompts, kind: str, batch: int, new_tokens: int, seed: int) -> Callable:
    """trainer._loss's on-policy data per step: student.sample, then the target's teacher_forced_logits."""
    device = introspect.model_device(model)
    student = build_student(kind, model, seed=seed)
    student.module.to(device)

    def run(n: int, short: bool = False) -> dict:
        scored = forwarded = 0
        timings = {"sample_s": 0.0, "score_s": 0.0}
        for sources in _batches([list(p) for p in prompts[:n]], batch):
            start = time.perf_counter()
            outputs = student.sample(sources, 4 if short else new_tokens, device)
            middle = time.perf_counter()
            with torch.no_grad():
                teacher_forced_logits(model, sources, outputs, device=device)
            timings["sample_s"] += middle - start
            timings["score_s"] += time.perf_counter() - middle
            scored += sum(len(o) for o in outputs)
            forwarded += sum(len(s) + len(o) for s, o in zip(sources, outputs))
        return {"scored": scored, "forwarded": forwarded, "rows": n, **timings}

    return run


# ---------------------------------------------------------------------------- driver


@dataclass
class Case:
    mode: str  # teacher-forced / pseudo-dataset / on-policy
    what: str
    run: Callable
    rows: int  # measured rows
    warm_group: str  # one 1-row warm-up per group


COLUMNS = [
    report.Column("mode", "mode"),
    report.Column("name", "case"),
    report.Column("what", "data"),
    report.Column("rows", "rows"),
    report.Column("forwarded", "tokens forwarded"),
    report.Column("scored", "tokens scored"),
    report.Column("seconds", "s", report.fmt_float(1)),
    report.Column("tokens_per_s", "scored tokens/s", report.fmt_float(1)),
    report.Column("forwarded_per_s", "forwarded tokens/s", report.fmt_float(0)),
    report.Column("vs_pseudo_b8", f"vs {BASELINE}", report.fmt_ratio(2)),
]


def build_cases(args, model, tokenizer, workdir: str) -> Dict[str, Case]:
    examples = load_examples("aclsum", split="train", limit=args.prompts)
    prompts = encode_prompts(tokenizer, model, [e.source for e in examples], args.max_source_length)
    refs = encode_references(tokenizer, [e.reference for e in examples], max_target_length=args.max_target_length)
    n, k = len(prompts), args.topk
    cases: Dict[str, Case] = {}
    tf = lambda p, o: teacher_forced_mode(model, p, o, args.tf_batch, k, workdir)  # noqa: E731
    cases["tf refs"] = Case("teacher-forced", f"aclsum train prompt + reference, top-{k}", tf(prompts, refs), n, "tf")
    cases["tf sources"] = Case("teacher-forced", f"the prompts alone, (p[:1], p[1:]), top-{k}",
                               tf([p[:1] for p in prompts], [p[1:] for p in prompts]), n, "tf")
    if args.papers:
        papers = load_examples("aclsum_papers", limit=args.papers)
        ids = encode_prompts(tokenizer, model, [e.source for e in papers], args.paper_tokens)
        cases["tf papers"] = Case("teacher-forced", f"aclsum_papers cut to {args.paper_tokens} tokens, top-{k}",
                                  tf([p[:1] for p in ids], [p[1:] for p in ids]), len(ids), "tf")
    if not args.no_features:
        pairs = [(list(p), list(r)) for p, r in zip(prompts, refs)]
        cases["features refs"] = Case(
            "teacher-forced", f"extract_features, prompt + reference, default layers, top-{k}",
            features_mode(model, pairs, args.tf_batch, k, args.max_source_length + args.max_target_length), n, "features")
    for b in _sizes(args.batch_sizes):
        cases[f"pseudo fp32 b={b}"] = Case("pseudo-dataset", f"greedy, ≤{args.new_tokens} new, batch {b}, fp32",
                                           pseudo_mode(model, prompts, b, args.new_tokens, 0, workdir), n, "pseudo fp32")
    if args.topk_cache:
        cases["pseudo fp32 b=8 +top-k"] = Case("pseudo-dataset", f"as b=8, + top-{k} logits cache (topk_logits)",
                                                pseudo_mode(model, prompts, 8, args.new_tokens, k, workdir), n, "pseudo fp32")
    bf16_sizes = _sizes(args.bf16_batch_sizes)
    if bf16_sizes:
        model16, _ = load_target_and_tokenizer("smollm2", "cpu", dtype=torch.bfloat16)
        emulated = "" if cpu_has_bf16_units() else " (emulated: no bf16 units)"
        for b in bf16_sizes:
            cases[f"pseudo bf16 b={b}"] = Case("pseudo-dataset", f"greedy, ≤{args.new_tokens} new, batch {b}, bf16{emulated}",
                                               pseudo_mode(model16, prompts, b, args.new_tokens, 0, workdir), n, "pseudo bf16")
    for kind in [s.strip() for s in args.op_drafters.split(",") if s.strip()]:
        cases[f"on-policy {kind}"] = Case(
            "on-policy", f"fresh {kind} student samples ≤{args.op_new_tokens}, batch {args.op_batch}; target scores them",
            on_policy_mode(model, prompts, kind, args.op_batch, args.op_new_tokens, args.seed), n, f"op {kind}")
    return cases


def run_bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_target_and_tokenizer("smollm2", "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as workdir:
        cases = build_cases(args, model, tokenizer, workdir)
        warmed = set()
        for case in cases.values():  # one small unrecorded call per group
            if case.warm_group not in warmed:
                case.run(1, short=True)
                warmed.add(case.warm_group)
        per_round: Dict[str, List[dict]] = {name: [] for name in cases}
        for r in range(args.rounds):  # every case once per round, in turn
            for name, case in cases.items():
                start = time.perf_counter()
                figures = case.run(case.rows)
                figures["seconds"] = time.perf_counter() - start
                per_round[name].append(figures)
                print(f"round {r + 1}/{args.rounds} {name}: {figures['scored']} tokens scored, "
                      f"{figures['forwarded']} forwarded, {figures['seconds']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for name, case in cases.items():
        rounds = per_round[name]
        row = {"name": name, "mode": case.mode, "what": case.what, "rows": rounds[0]["rows"],
               "scored": rounds[0]["scored"], "forwarded": rounds[0]["forwarded"],
               "seconds": statistics.median(f["seconds"] for f in rounds),
               "tokens_per_s": statistics.median(f["scored"] / f["seconds"] for f in rounds),
               "forwarded_per_s": statistics.median(f["forwarded"] / f["seconds"] for f in rounds)}
        if BASELINE in per_round:
            row["vs_pseudo_b8"] = statistics.median((f["scored"] / f["seconds"]) / (g["scored"] / g["seconds"])
                                                    for f, g in zip(rounds, per_round[BASELINE]))
        for key in ("sample_s", "score_s"):
            if key in rounds[0]:
                row[key] = statistics.median(f[key] for f in rounds)
        rows.append(row)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    settings.update(torch_threads=torch.get_num_threads(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
                    torch=torch.__version__, bf16_units=cpu_has_bf16_units(), total_s=time.perf_counter() - started)
    return {"settings": settings, "rows": rows}


def render(result: dict) -> str:
    rows, s = result["rows"], result["settings"]
    lines = [f"SmolLM2-135M-Instruct (fp32 unless said), aclsum train, {s['prompts']} prompts; "
             f"torch threads {s['torch_threads']}, OMP_NUM_THREADS={s['OMP_NUM_THREADS']}, rounds {s['rounds']}, "
             f"total {s['total_s']:.0f} s", "", report.markdown_table(rows, COLUMNS)]
    split = [r for r in rows if "sample_s" in r]
    if split:
        lines += ["", "on-policy time split (median s): " + "; ".join(
            f"{r['name']}: sample {r['sample_s']:.2f}, target scoring {r['score_s']:.2f}" for r in split)]
    by_name = {r["name"]: r for r in rows}
    ratios = []
    for name, row in by_name.items():  # batch scaling and bf16 vs fp32 (the vs-b=8 ratios are in the table)
        for other in ("pseudo fp32 b=1", name.replace("bf16", "fp32")):
            if name.startswith("pseudo") and other != name and other in by_name:
                ratios.append(f"{name} / {other}: {row['tokens_per_s'] / by_name[other]['tokens_per_s']:.2f}×")
    if ratios:
        lines += ["", "other ratios of scored tokens/s (of the medians): " + "; ".join(ratios)]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    result = run_bench(args)
    text = render(result)
    print(text)
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    return result


def test_data_modes(benchmark):
    """pytest-benchmark entry: one pedantic round of the whole script (knobs: FASTSPEC_BENCH_DATA_ARGS)."""
    import pytest

    from fastspec.targets import smollm2_folder

    if not os.path.exists(str(smollm2_folder())):
        pytest.skip("SmolLM2 is not in the offline cache")
    argv = shlex.split(os.environ.get("FASTSPEC_BENCH_DATA_ARGS", ""))
    result = benchmark.pedantic(lambda: main(argv), rounds=1, iterations=1)
    benchmark.extra_info.update(result)


if __name__ == "__main__":
    main()
