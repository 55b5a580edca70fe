"""Batched speculative decoding vs batched autoregressive decoding on the real SmolLM2-135M-Instruct
(aclsum test prompts in the chat template, left padded, greedy), every decoder interleaved per batch
and round, every output asserted identical to AR's.

Decoders: fastspec AR (γ 0), prompt lookup on the ragged cache (each row keeps all its committed
tokens, holes masked: the default) with and without the default row cap ``max_verify_rows``, and
prompt lookup on the rectangular cache the engine used before (cropped to the shortest row, the
rest re-fed), selected here by patching ``fastspec.engine.session.supports_holes``.

Run::

    python bench/bench_batch.py --batch_sizes 1 3 8 --num_prompts 8 --rounds 2
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

import fastspec
from fastspec.data import encode_prompts, load_examples
from fastspec.distill.teacher import pad_left
from fastspec.drafters import PromptLookupDrafter
from fastspec.engine import session as session_module
from fastspec.targets import load_target_and_tokenizer


@contextlib.contextmanager
def rectangular_cache():
    with mock.patch.object(session_module, "supports_holes", lambda cache: False):
        yield


# name -> (drafter factory, context, engine options); the default row cap (max_verify_rows, fp32
# only) shrinks γ with the batch, so the ragged cache also runs without it
DECODERS = {
    "AR": (lambda: None, contextlib.nullcontext, {}),
    "prompt lookup, ragged cache (default row cap)": (lambda: PromptLookupDrafter(max_n=3), contextlib.nullcontext, {}),
    "prompt lookup, ragged cache, no row cap": (lambda: PromptLookupDrafter(max_n=3), contextlib.nullcontext,
                                                {"max_verify_rows": 0}),
    "prompt lookup, rectangular cache, no row cap": (lambda: PromptLookupDrafter(max_n=3), rectangular_cache,
                                                     {"max_verify_rows": 0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_source_length", type=int, default=512)
    parser.add_argument("--dtype", default="float32", help="target dtype (in bf16 outputs may part at near-ties)")
    args = parser.parse_args()

    target, tokenizer = load_target_and_tokenizer("smollm2", "cpu", dtype=args.dtype)
    sources = [e.source for e in load_examples("aclsum", split="test", limit=args.num_prompts)]
    prompts = encode_prompts(tokenizer, target, sources, args.max_source_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(f"{args.dtype}, torch threads {torch.get_num_threads()}, {len(prompts)} prompts, γ {args.gamma}, "
          f"{args.max_new_tokens} new tokens, {args.rounds} rounds")
    for batch in args.batch_sizes:
        groups = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
        seconds = {name: [] for name in DECODERS}
        tokens = {name: 0 for name in DECODERS}
        calls = {name: 0 for name in DECODERS}
        differ = {name: 0 for name in DECODERS}  # batches whose outputs part from AR's (low precision only)
        for _ in range(args.rounds):
            for group in groups:
                ids, mask = pad_left(group, pad_id)
                reference = None
                for name, (make_drafter, context, options) in DECODERS.items():
                    with context():
                        start = time.perf_counter()
                        out = fastspec.generate(target, make_drafter(), ids, mask, gamma=args.gamma,
                                                max_new_tokens=args.max_new_tokens, do_sample=False, **options)
                        seconds[name].append(time.perf_counter() - start)
                    tokens[name] += out.metrics.num_generated_tokens
                    calls[name] += out.metrics.target_calls
                    if reference is None:
                        reference = out.sequences
                    elif not torch.equal(out.sequences, reference):
                        differ[name] += 1
                        if args.dtype == "float32":
                            raise AssertionError(f"{name} at batch {batch} differs from AR")
        total = {name: sum(s) for name, s in seconds.items()}
        print(f"\nbatch {batch} ({len(groups)} batches x {args.rounds} rounds)")
        print("| decoder | tokens/s | speed vs batched AR | target calls | median batch time | batches differing from AR |")
        print("|---|---|---|---|---|---|")
        for name in DECODERS:
            print(f"| {name} | {tokens[name] / total[name]:.1f} | {total['AR'] / total[name]:.2f}x | "
                  f"{calls[name]} | {statistics.median(seconds[name]):.2f} s | {differ[name]} |")


if __name__ == "__main__":
    main()
