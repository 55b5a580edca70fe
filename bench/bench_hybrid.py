"""The hybrid's rule, measured: α and τ of prompt lookup alone, a feature drafter alone, and the
hybrid PromptLookupDrafter(fallback=feature drafter) at several min_n / max_n, on the real
SmolLM2-135M-Instruct over aclsum test prompts (greedy, chat prompts).

OFFLINE REPLAY (fastspec.distill.replay.replay_runs): the target's own greedy outputs are generated
once (cached in --outputs_cache), then every drafter runs the engine's loop along them with no
target forward per step; α/τ equal the engine's exactly (DESIGN §8 "Offline α replay"). The
feature drafter gets the target's features from one teacher-forced forward per prompt.

Train a feature drafter first (≤ 4 min of training), e.g.::

    OMP_NUM_THREADS=1 fastspec train --drafter feature --exp_name hyb --output_root /tmp/hyb_runs \\
        --num_samples 100 --max_target_length 64 --time_budget_s 240 --max_steps 100000

Run::

    OMP_NUM_THREADS=1 python bench/bench_hybrid.py --num_prompts 20 --drafter /tmp/hyb_runs/hyb/drafter

Rules: "min_n m": a row whose last n ≥ m tokens match takes the lookup draft, else the feature
drafter's; "confirm_n c" (with min_n 1): a match shorter than c is taken only where the feature
drafter's own first token agrees with the lookup's first token.

Columns: α and τ as the engine's metrics define them (over the steps that drafted: a lookup step
with no match drafts nothing and is left out of both), then tokens/call = emitted tokens / target
calls over ALL steps (the figure that compares drafters which sometimes draft nothing), steps
(target calls), drafted tokens per step, and "lookup rows" (share of steps whose draft came from
the lookup arm).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastspec import introspect
from fastspec.data import encode_prompts, load_examples
from fastspec.distill.feature_data import pseudo_pairs
from fastspec.distill.replay import replay_runs
from fastspec.drafters import PromptLookupDrafter
from fastspec.drafters.io import load_drafter
from fastspec.eval import Decoder, compare, hf_generate_decoder
from fastspec.targets import load_target_and_tokenizer


class LookupShare:
    """Wraps a hybrid to count the steps (active rows) whose draft came from the lookup arm."""

    def __init__(self, drafter):
        self.drafter, self.lookup_rows, self.rows = drafter, 0, 0
        draft = drafter.draft

        def counted(step):
            out = draft(step)
            active = step.active.cpu().bool()
            self.lookup_rows += int((drafter.last_lookup_rows & active).sum())
            self.rows += int(active.sum())
            return out

        drafter.draft = counted

    @property
    def share(self) -> float:
        return self.lookup_rows / max(self.rows, 1)


# Out-of-domain text that exists offline: module docstrings of Python's standard library (technical
# prose with code, never in aclsum). Imported by name; a module missing on a build is skipped.
PYTHON_DOC_MODULES = (
    "argparse", "csv", "re", "statistics", "configparser", "socketserver", "wave", "ssl", "http.cookies",
    "cmd", "site", "socket", "hashlib", "pyclbr", "timeit", "unittest", "copy", "uuid", "plistlib", "pydoc",
    "xmlrpc.client", "io", "heapq", "struct", "itertools", "sched", "inspect", "xml.etree.ElementTree", "doctest",
    "gc", "ftplib", "os", "typing", "ast", "http.server", "random", "sqlite3",
)


def python_doc_sources(limit: int, min_chars: int = 700):
    """Docstrings (≥ min_chars) of PYTHON_DOC_MODULES, as summarization sources."""
    import importlib
    import inspect

    sources = []
    for name in PYTHON_DOC_MODULES:
        try:
            doc = inspect.getdoc(importlib.import_module(name)) or ""
        except ImportError:
            continue
        if len(doc) >= min_chars:
            sources.append(doc)
        if len(sources) == limit:
            break
    return sources


def target_outputs(target, prompts, args):
    """The target's greedy new tokens per prompt (EOS included), cached in --outputs_cache."""
    key = {"dtype": str(introspect.model_dtype(target)), "max_new_tokens": args.max_new_tokens, "prompts": prompts}
    if args.outputs_cache and os.path.isfile(args.outputs_cache):
        with open(args.outputs_cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["outputs"]
    started = time.perf_counter()
    pairs = pseudo_pairs(target, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         progress=True)
    outputs = [list(o) for _, o in pairs]
    print(f"target outputs: {sum(map(len, outputs))} tokens in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    if args.outputs_cache:
        with open(args.outputs_cache, "w") as f:
            json.dump({"key": key, "outputs": outputs}, f)
    return outputs


def build_drafters(args, target):
    """{name: drafter}: lookup alone, the feature drafter alone, the hybrids."""
    def feature(threshold=None):  # None: the threshold saved with the drafter (load_drafter's default)
        drafter = load_drafter(args.drafter, target=target)
        if threshold is not None:
            drafter.confidence_threshold = threshold
        return drafter

    drafters = {f"prompt lookup (max_n {n})": PromptLookupDrafter(max_n=n, min_n=1) for n in args.max_n}
    if args.drafter:
        saved = feature()
        drafters[f"feature drafter (saved threshold {saved.confidence_threshold:g})"] = saved
        for t in args.confidence:
            drafters[f"feature drafter, confidence ≥ {t}"] = feature(t)
            for n in args.max_n:
                drafters[f"hybrid max_n {n} min_n 1, confidence ≥ {t}"] = PromptLookupDrafter(
                    max_n=n, min_n=1, fallback=feature(t))
        for n in args.max_n:
            for m in args.min_n:
                if m <= n:
                    drafters[f"hybrid max_n {n} min_n {m}"] = PromptLookupDrafter(max_n=n, min_n=m, fallback=feature())
            for c in args.confirm_n:  # min_n 1, a match shorter than c needs the fallback's agreement
                if 1 < c <= n:
                    drafters[f"hybrid max_n {n} min_n 1 confirm_n {c}"] = PromptLookupDrafter(
                        max_n=n, min_n=1, confirm_n=c, fallback=feature())
    return drafters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_prompts", type=int, default=20)
    p.add_argument("--drafter", default="/tmp/hyb_runs/hyb/drafter", help="a saved feature drafter ('' = none)")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--max_n", type=int, nargs="+", default=[3, 4])
    p.add_argument("--min_n", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--confirm_n", type=int, nargs="*", default=[2, 3],
                   help="hybrids with min_n 1 whose matches shorter than this need the fallback's first token")
    p.add_argument("--confidence", type=float, nargs="*", default=[],
                   help="also the feature drafter and the hybrid (min_n 1) with these confidence thresholds")
    p.add_argument("--speed_prompts", type=int, default=0,
                   help="also time the real engine with every drafter (and HF prompt lookup) on this many prompts")
    p.add_argument("--split", default="test")
    p.add_argument("--domain", default="aclsum", choices=("aclsum", "python_docs"),
                   help="aclsum (in domain for drafters trained on aclsum) or python_docs: docstrings of the "
                   "standard library (out of domain, offline)")
    p.add_argument("--max_source_length", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch_size", type=int, default=10, help="batch of the target's greedy generation")
    p.add_argument("--outputs_cache", default="/tmp/hyb_runs/outputs.json")
    args = p.parse_args(argv)
    if args.drafter and not os.path.isdir(args.drafter):
        p.error(f"--drafter {args.drafter}: no such folder (train one, or pass --drafter '')")
    torch.manual_seed(0)
    target, tokenizer = load_target_and_tokenizer("smollm2", "cpu", dtype=args.dtype)
    if args.domain == "aclsum":
        sources = [e.source for e in load_examples("aclsum", split=args.split, limit=args.num_prompts)]
    else:
        sources = python_doc_sources(args.num_prompts)
    prompts = encode_prompts(tokenizer, target, sources, args.max_source_length)
    if args.outputs_cache:
        os.makedirs(os.path.dirname(os.path.abspath(args.outputs_cache)), exist_ok=True)
    outputs = target_outputs(target, prompts, args)
    drafters = build_drafters(args, target)
    shares = {name: LookupShare(d) for name, d in drafters.items() if isinstance(d, PromptLookupDrafter)}
    rows, emitted = [], sum(len(o) for o in outputs)  # greedy: every drafter emits the target's outputs
    for name, drafter in drafters.items():
        started = time.perf_counter()
        metrics = replay_runs(target, {name: drafter}, prompts, outputs, gamma=args.gamma,
                              max_new_tokens=args.max_new_tokens)[name]
        m = metrics.as_dict()
        share = shares[name].share if name in shares else None
        rows.append((name, m["acceptance_rate"], m["mean_accepted_length"], emitted / max(m["num_steps"], 1),
                     m["num_steps"], m["num_draft_tokens"] / max(m["num_steps"], 1), share,
                     time.perf_counter() - started))
        print(f"{name}: α {rows[-1][1]:.3f} τ {rows[-1][2]:.3f}", file=sys.stderr)
    where = f"aclsum {args.split}[:{len(prompts)}]" if args.domain == "aclsum" else f"{len(prompts)} stdlib docstrings"
    print(f"\nSmolLM2-135M-Instruct ({args.dtype}), {where} chat prompts, greedy, "
          f"{args.max_new_tokens} new tokens ({emitted} in all), γ {args.gamma}, offline replay; "
          f"feature drafter: {args.drafter or 'none'}")
    print("| drafter | α | τ | tokens/call | steps | drafted/step | lookup rows | replay s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, alpha, tau, per_call, steps, per_step, share, seconds in rows:
        share_text = "-" if share is None else f"{share:.2f}"
        print(f"| {name} | {alpha:.3f} | {tau:.3f} | {per_call:.3f} | {steps} | {per_step:.2f} | {share_text} | "
              f"{seconds:.1f} |")
    if args.speed_prompts:
        timed(args, target, prompts[: args.speed_prompts], drafters)
    return 0


def timed(args, target, prompts, drafters):
    """The real engine on the first prompts: every drafter above and HF's prompt lookup against
    fastspec's autoregressive decoding, interleaved per prompt (eval.compare)."""
    decoders = [Decoder(name, drafter, args.gamma) for name, drafter in drafters.items()]
    # the target as plain torch/transformers runs it: BLAS linears, SDPA with the KV repeat, a
    # re-concatenated KV cache
    plain = {"skinny_linear": False, "grouped_attention": False, "inplace_cache": False}
    decoders.append(Decoder("AR, plain transformers paths", None, options=plain))
    for name in [n for n in drafters if n.startswith("prompt lookup")]:
        decoders.append(Decoder(f"{name}, plain transformers paths", drafters[name], args.gamma, options=plain))
    decoders.append(hf_generate_decoder(target, "HF greedy"))
    decoders.append(hf_generate_decoder(target, "HF prompt_lookup_num_tokens=3", prompt_lookup_num_tokens=3))
    result = compare(target, decoders, prompts, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                     generate_kwargs={"do_sample": False}, progress=False, desc="speed")
    print(f"\nreal engine, {len(prompts)} prompts, {args.max_new_tokens} new tokens, γ {args.gamma} ({args.dtype}, batch 1)")
    print("| decoder | α | τ | c | speedup vs fastspec AR | identical to AR |")
    print("|---|---|---|---|---|---|")
    for row in result.rows:
        def cell(key, fmt):
            return "-" if row.get(key) is None else format(row[key], fmt)

        print(f"| {row['name']} | {cell('acceptance_rate', '.3f')} | {cell('mean_accepted_length', '.2f')} | "
              f"{cell('c', '.3f')} | {cell('speedup', '.2f')}× | {row.get('identical')} |")


if __name__ == "__main__":
    sys.exit(main())
