"""The command-line flags that several commands share, and their up-front checks (before anything
loads). One definition, so ``train``, ``pseudo``, ``eval``, ``generate``, ``bench`` and ``demo`` agree."""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from fastspec import precision
from fastspec.errors import UserError
from fastspec.precision import DRAFTER_DTYPES
from fastspec.targets import SMOLLM2


def generation_kwargs(args) -> Dict[str, Any]:
    """transformers-named generation controls from the CLI sampling flags."""
    kwargs: Dict[str, Any] = {"do_sample": bool(getattr(args, "do_sample", False))}
    if kwargs["do_sample"]:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return kwargs


def add_target_flags(p: argparse.ArgumentParser, max_source_length: int = 512) -> None:
    p.add_argument("--target", default=SMOLLM2,
                   help=f"'{SMOLLM2}' (the offline SmolLM2-135M-Instruct), a local HF folder, or a hub name")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (under torchrun: cuda = cuda:LOCAL_RANK)")
    p.add_argument("--max_source_length", type=int, default=max_source_length,
                   help="truncate prompts to this many tokens (a warning counts them)")
    p.add_argument("--dtype", default="float32", metavar="{auto,float32,bfloat16,float16}",
                   help="the target's dtype (default float32, the exactness reference; auto: bf16 where the device "
                   "has bf16 units, else fp32). In bf16/fp16 greedy outputs may part from autoregressive decoding "
                   "at near-ties; eval/bench report where")


def add_drafter_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter_dtype", default=None, metavar="{" + ",".join(DRAFTER_DTYPES) + "}",
                   help="the drafters' dtype (default: the target's); int8: dynamically quantized on the CPU "
                   "(torch.ao; CNN/LSTM then run their Python path). The target is never quantized")


def add_data_flags(p: argparse.ArgumentParser, split: str, num_samples: Optional[int] = None) -> None:
    p.add_argument("--dataset", default="aclsum",
                   help="'aclsum', 'aclsum:<section>[:<aspect>+...]', 'aclsum_papers' (the unlabeled full papers of --split; --split all: all 250) or a path to a "
                   "CNN/DailyMail copy (datasets folder, .jsonl/.csv with article/highlights, or .story folders)")
    p.add_argument("--split", default=split, help=f"data split (default {split})")
    p.add_argument("--num_samples", type=int, default=num_samples,
                   help="use only the first N examples" + (f" (default {num_samples})" if num_samples else ""))


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)


def check_flags(args) -> None:
    """The numeric flags a command has, checked before anything is loaded."""
    for name in ("gamma", "max_new_tokens", "repeats", "num_samples", "num_train", "num_test", "batch_size",
                 "max_steps", "max_source_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if getattr(args, "dtype", None) is not None:  # a name this device can run, announced once
        try:
            precision.resolve_dtype(args.dtype, getattr(args, "device", None) or "cpu", announce=True)
        except UserError as err:
            raise UserError(f"--dtype {args.dtype}: {err}") from None
    drafter_dtype = getattr(args, "drafter_dtype", None)
    if drafter_dtype is not None and str(drafter_dtype).lower() not in DRAFTER_DTYPES + ("fp32", "bf16", "fp16"):
        raise UserError(f"--drafter_dtype {drafter_dtype!r}: accepted: {', '.join(DRAFTER_DTYPES)}")
    if getattr(args, "do_sample", False):
        if args.temperature <= 0:
            raise UserError(f"--temperature must be > 0 when sampling, got {args.temperature}")
        if args.top_k < 0 or not 0 < args.top_p <= 1:
            raise UserError(f"--top_k must be >= 0 and --top_p in (0, 1], got {args.top_k} and {args.top_p}")
