"""The ``fastspec`` command line (console script ``fastspec = fastspec.cli:main``).

Subcommands: ``train``, ``pseudo``, ``eval``, ``generate``, ``bench``, ``demo``. Flag names
mirror the seed project's ``run.py`` (``--drafter --exp_name --loss --kd_loss --kd_temp
--distill_method --ngram_n --pseudo_dataset_path``; ``eval --ckpt_path --device``).

User errors (bad flags, missing or corrupt files, a drafter whose vocabulary does not match
the target) end with a one-line ``fastspec <cmd>: error: ...`` and exit status 2; set
``FASTSPEC_DEBUG=1`` (or pass ``--debug``) for the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import List, Optional

DRAFTERS = ("ngram", "cnn", "lstm", "t5small", "hf", "layerskip")
EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------- shared flags


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2",
                   help="'smollm2' (the offline SmolLM2-135M-Instruct), a local HF folder, or a hub name")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (under torchrun: cuda = cuda:LOCAL_RANK)")
    p.add_argument("--max_source_length", type=int, default=512, help="truncate prompts to this many tokens (a warning counts them)")


def _add_data_flags(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--dataset", default="aclsum",
                   help="'aclsum', 'aclsum:<section>[:<aspect>+...]', 'aclsum_papers' (unlabeled) or a path to a "
                   "CNN/DailyMail copy (datasets folder, .jsonl/.csv with article/highlights, or .story folders)")
    p.add_argument("--split", default=split, help=f"data split (default {split})")
    p.add_argument("--num_samples", type=int, default=None, help="use only the first N examples")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastspec", description="Lossless speculative decoding for HF LLMs: "
                                     "train drafters (baseline or distilled), make pseudo-datasets, evaluate, generate.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- train
    t = sub.add_parser("train", help="train a drafter (baseline CE on references, or knowledge distillation)",
                       description="Train a drafter. total loss = --loss * CE(references) + --kd_loss * KD.")
    t.add_argument("--drafter", required=True, choices=DRAFTERS,
                   help="ngram: fit counts (--ngram_n); cnn/lstm: small neural drafters; t5small/hf: a HF model "
                   "(--init_from); layerskip: fine-tune the target's early-exit head")
    t.add_argument("--exp_name", required=True, help="experiment name: outputs go to <--output_root>/<exp_name>/")
    t.add_argument("--output_root", default="fastspec_out", help="parent folder of experiments")
    _add_target_flags(t)
    _add_data_flags(t, "train")
    t.add_argument("--pseudo_dataset_path", default=None,
                   help="a folder written by `fastspec pseudo`: its target outputs are the KD/seq_kd sequences "
                   "(n-gram: fit on them instead of the references)")
    t.add_argument("--loss", type=float, default=1.0, help="weight of cross-entropy on the references (baseline)")
    t.add_argument("--kd_loss", type=float, default=0.0, help="weight of the knowledge-distillation term")
    t.add_argument("--kd_temp", type=float, default=1.0, help="KD temperature T (KL terms are scaled by T²)")
    t.add_argument("--distill_method", default="fkl", choices=("seq_kd", "fkl", "rkl", "jsd", "tvd", "on_policy"),
                   help="seq_kd: CE on target pseudo outputs; fkl (the seed's): forward KL; rkl/jsd/tvd: DistillSpec "
                   "divergences; on_policy: the drafter samples, the target scores (with --on_policy_divergence)")
    t.add_argument("--on_policy_divergence", default="fkl", choices=("fkl", "rkl", "jsd", "tvd"))
    t.add_argument("--on_policy_max_new_tokens", type=int, default=32)
    t.add_argument("--teacher_logits", default="online", choices=("online", "cache"),
                   help="online: a no-grad target forward per batch; cache: the top-k logits stored by "
                   "`fastspec pseudo --topk_logits K`")
    t.add_argument("--ngram_n", type=int, default=4, help="n of the n-gram drafter")
    t.add_argument("--init_from", default=None, help="t5small/hf: a local HF folder to start from (the drafter model)")
    t.add_argument("--drafter_config", default="{}",
                   help='JSON of drafter architecture options, e.g. \'{"hidden_size": 256, "num_layers": 1}\'')
    t.add_argument("--max_target_length", type=int, default=128, help="cut references to this many tokens")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--batch_size", type=int, default=8, help="global batch (split across torchrun ranks)")
    t.add_argument("--max_steps", type=int, default=200)
    t.add_argument("--warmup_steps", type=int, default=10)
    t.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    t.add_argument("--amp", default=None, choices=("off", "bf16", "fp16"), help="autocast (default: bf16 on CUDA, off on CPU)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt_every", type=int, default=50, help="checkpoint every N steps (atomic)")
    t.add_argument("--eval_every", type=int, default=0, help="measure α every N steps (0 = at the end only)")
    t.add_argument("--eval_samples", type=int, default=4, help="validation prompts for α (0 = no α)")
    t.add_argument("--eval_max_new_tokens", type=int, default=32)
    t.add_argument("--gamma", type=int, default=5, help="γ for the α measurement")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this experiment")
    t.add_argument("--no_progress", action="store_true")

    # ---- pseudo
    p = sub.add_parser("pseudo", help="the target writes a pseudo-dataset (its outputs on training sources)",
                       description="Sharded, resumable, torchrun-aware: `torchrun --nproc_per_node N -m fastspec.cli pseudo ...`")
    _add_target_flags(p)
    _add_data_flags(p, "train")
    p.add_argument("--out", required=True, help="output folder (re-running the same command resumes)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--max_target_length", type=int, default=128, help="cut stored references to this many tokens")
    _add_sampling_flags(p)
    p.add_argument("--gamma", type=int, default=5, help="γ when --drafter_ckpt speeds up generation")
    p.add_argument("--drafter_ckpt", default=None, help="a drafter folder to speculate with (lossless: same outputs, faster)")
    p.add_argument("--topk_logits", type=int, default=0, help="also cache the target's top-K logits per token (0 = off)")
    p.add_argument("--no_progress", action="store_true")

    # ---- eval / demo (owned by fastspec.eval / fastspec.demo)
    for name, module, text in (("eval", "fastspec.eval", "α, τ, speed and ROUGE of drafters vs autoregressive decoding"),
                               ("demo", "fastspec.demo", "the whole product offline on SmolLM2 + aclsum")):
        sp = sub.add_parser(name, help=text, description=text)
        mod = _optional_module(module)
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(sp)
        else:
            sp.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    # ---- generate
    g = sub.add_parser("generate", help="text in, text out, with speculative metrics",
                       description="Summarize/complete text with the target, speculatively with a drafter.")
    _add_target_flags(g)
    g.add_argument("--text", default=None, help="the input text (default: read stdin)")
    g.add_argument("--raw", action="store_true", help="feed the text as is (no summarize:/chat template)")
    g.add_argument("--ckpt_path", default=None, help="a drafter folder saved by `fastspec train`")
    g.add_argument("--drafter", default=None, choices=("prompt_lookup", "none"),
                   help="a drafter that needs no checkpoint (default: prompt_lookup when no --ckpt_path)")
    g.add_argument("--gamma", type=int, default=5)
    g.add_argument("--max_new_tokens", type=int, default=64)
    _add_sampling_flags(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text + metrics)")

    # ---- bench
    b = sub.add_parser("bench", help="interleaved speed comparison: autoregressive vs drafters (same engine)",
                       description="Ratios measured in one run: each prompt is decoded by every decoder in turn.")
    _add_target_flags(b)
    _add_data_flags(b, "test")
    b.add_argument("--ckpt_path", nargs="*", default=[], help="drafter folders to compare")
    b.add_argument("--builtin", nargs="*", default=["prompt_lookup"], choices=["prompt_lookup"])
    b.add_argument("--gamma", type=int, default=5)
    b.add_argument("--max_new_tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3, help="passes over the prompts; medians are reported")
    b.add_argument("--no_progress", action="store_true")
    return parser


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            return None
        raise


# --------------------------------------------------------------------------- helpers


def _check_target(spec: str) -> None:
    """A target that looks like a path must exist (hub names are 'name' or 'org/name')."""
    if spec in ("smollm2", ""):
        return
    looks_like_path = os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1
    if (looks_like_path or "/" not in spec) and not os.path.exists(os.path.expanduser(spec)):
        raise ValueError(f"--target {spec!r}: no such folder (and not 'smollm2' or a hub name)")


def _load_target(args):
    from fastspec.eval import load_target_and_tokenizer

    _check_target(args.target)
    return load_target_and_tokenizer(args.target, args.device)


def _encode(tokenizer, target, sources, max_source_length):
    from fastspec.eval import encode_prompts

    return encode_prompts(tokenizer, target, sources, max_source_length)


def _load_drafter_folder(path: str, target=None):
    from fastspec.drafters.io import load_drafter
    from fastspec.distill.teacher import vocab_size

    from fastspec.drafters.io import read_config

    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such drafter folder (missing checkpoint)")
    if read_config(path)["kind"] == "layer_skip":  # its weights are the target's (+ a trained exit head)
        from fastspec.distill.layerskip import load_layerskip_drafter

        if target is None:
            raise ValueError(f"{path}: a layer-skip drafter needs its target")
        return load_layerskip_drafter(path, target)
    drafter = load_drafter(path)
    theirs = getattr(drafter, "vocab_size", None)
    if target is not None and theirs is not None and theirs != vocab_size(target):
        raise ValueError(f"{path}: wrong vocab: the drafter has {theirs} tokens, the target {vocab_size(target)}")
    return drafter


def _gen_kwargs(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample)}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return kwargs


# --------------------------------------------------------------------------- commands


def cmd_pseudo(args) -> int:
    from fastspec.data import encode_references, load_examples
    from fastspec.distill.distributed import init_distributed, shutdown
    from fastspec.distill.pseudo import PseudoSettings, SourceRecord, generate_pseudo_dataset

    info = init_distributed(args.device)
    try:
        args.device = str(info.device)
        examples = load_examples(args.dataset, split=args.split, limit=args.num_samples)
        target, tokenizer = _load_target(args)
        prompts = _encode(tokenizer, target, [e.source for e in examples], args.max_source_length)
        refs = encode_references(tokenizer, [e.reference for e in examples], max_target_length=args.max_target_length)
        sources = [SourceRecord(i, e.id, p, r) for i, (e, p, r) in enumerate(zip(examples, prompts, refs))]
        drafter = _load_drafter_folder(args.drafter_ckpt, target) if args.drafter_ckpt else None
        settings = PseudoSettings(
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, gamma=args.gamma,
            topk_logits=args.topk_logits,
        )
        merged = generate_pseudo_dataset(target, sources, args.out, settings, drafter=drafter, dist_info=info,
                                         target_name=args.target, progress=not args.no_progress)
        if merged:
            print(f"pseudo-dataset: {len(sources)} records in {merged}")
    finally:
        shutdown()
    return 0


def cmd_train(args) -> int:
    from fastspec.distill.trainer import TrainingError, train_from_cli

    try:
        drafter_kwargs = json.loads(args.drafter_config)
    except json.JSONDecodeError as err:
        raise TrainingError(f"--drafter_config is not valid JSON: {err.msg}") from None
    if not isinstance(drafter_kwargs, dict):
        raise TrainingError("--drafter_config must be a JSON object")
    _check_target(args.target)
    if args.pseudo_dataset_path and not os.path.exists(args.pseudo_dataset_path):
        raise TrainingError(f"--pseudo_dataset_path {args.pseudo_dataset_path}: no such folder")
    if args.resume and not os.path.isdir(os.path.join(args.output_root, args.exp_name, "checkpoints")):
        raise TrainingError(f"--resume: no checkpoint in {os.path.join(args.output_root, args.exp_name)}")
    return train_from_cli(args, drafter_kwargs)


def cmd_generate(args) -> int:
    import torch

    import fastspec
    from fastspec.distill.teacher import is_encoder_decoder

    text = args.text if args.text is not None else sys.stdin.read()
    if not text.strip():
        raise ValueError("no input text (give --text or pipe text on stdin)")
    if args.ckpt_path and args.drafter:
        raise ValueError("give either --ckpt_path or --drafter, not both")
    if args.ckpt_path and not os.path.isdir(args.ckpt_path):
        raise ValueError(f"{args.ckpt_path}: no such drafter folder (missing checkpoint)")
    target, tokenizer = _load_target(args)
    if args.ckpt_path:
        drafter = _load_drafter_folder(args.ckpt_path, target)
    elif args.drafter == "none":
        drafter = None
    else:
        from fastspec.drafters import PromptLookupDrafter

        drafter = PromptLookupDrafter()
    if args.raw:
        ids = tokenizer(text, truncation=True, max_length=args.max_source_length)["input_ids"]
    else:
        ids = _encode(tokenizer, target, [text], args.max_source_length)[0]
    input_ids = torch.tensor([ids], device=args.device)
    out = fastspec.generate(target, drafter, input_ids=input_ids, gamma=args.gamma, **_gen_kwargs(args))
    new = out.sequences[0, (1 if is_encoder_decoder(target) else len(ids)) :]
    output = tokenizer.decode(new, skip_special_tokens=True).strip()
    metrics = out.metrics.as_dict() if hasattr(out.metrics, "as_dict") else dict(out.metrics)
    if args.json:
        print(json.dumps({"text": output, "metrics": metrics}, default=str))
        return 0
    print(output)
    show = ("num_steps", "target_calls", "acceptance_rate", "mean_accepted_length", "total_time_s")
    print("\n-- " + ", ".join(f"{k}={_fmt(metrics.get(k))}" for k in show if k in metrics), file=sys.stderr)
    return 0


def _fmt(value):
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def cmd_bench(args) -> int:
    import statistics

    import torch

    from fastspec import report
    from fastspec.data import load_examples
    from fastspec.eval import AR_NAME, Decoder, decode_all, summarize

    if args.repeats < 1 or args.gamma < 1:
        raise ValueError("--repeats and --gamma must be >= 1")
    target, tokenizer = _load_target(args)
    examples = load_examples(args.dataset, split=args.split, limit=args.num_samples or 4)
    prompts = _encode(tokenizer, target, [e.source for e in examples], args.max_source_length)
    decoders = [Decoder(AR_NAME)]
    for path in args.ckpt_path:
        decoders.append(Decoder(os.path.basename(os.path.normpath(path)), _load_drafter_folder(path, target), args.gamma))
    for name in args.builtin:
        from fastspec.drafters import PromptLookupDrafter

        decoders.append(Decoder(name, PromptLookupDrafter(), args.gamma))
    per_repeat = []
    for _ in range(args.repeats):
        runs = decode_all(target, decoders, prompts, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                          generate_kwargs={"do_sample": False}, progress=not args.no_progress, desc="bench")
        per_repeat.append([summarize(runs[d.name], runs[AR_NAME], greedy=True) for d in decoders])
    rows = []
    for i, _ in enumerate(decoders):
        row = dict(per_repeat[-1][i])
        for key in ("speedup", "tokens_per_s"):
            values = [r[i].get(key) for r in per_repeat if r[i].get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        rows.append(row)
    print(f"{len(prompts)} prompts × {args.repeats} repeats, median over repeats, torch threads {torch.get_num_threads()}")
    print(report.text_table(rows, report.SPEC_COLUMNS))
    return 0


def _delegate(module_name: str, command: str):
    def run(args) -> int:
        module = _optional_module(module_name)
        if module is None or not hasattr(module, "main"):
            print(f"fastspec {command}: not yet implemented", file=sys.stderr)
            return EXIT_USER_ERROR
        return int(module.main(args) or 0)

    return run


COMMANDS = {
    "train": cmd_train,
    "pseudo": cmd_pseudo,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "eval": _delegate("fastspec.eval", "eval"),
    "demo": _delegate("fastspec.demo", "demo"),
}


def _user_errors():
    """Exception types that mean "the user gave something wrong" (one line, no traceback)."""
    errors = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FASTSPEC_DEBUG") == "1"
    try:
        status = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"fastspec {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fastspec {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # transformers: "... is not a local folder and is not a valid model identifier"
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fastspec {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
