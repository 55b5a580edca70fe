"""The ``fastspec`` command line (console script ``fastspec = fastspec.cli:main``).

Subcommands: ``train``, ``pseudo``, ``eval``, ``generate``, ``bench``, ``demo``, ``experiment``. Flag names
mirror the seed project's ``run.py`` (``--drafter --exp_name --loss --kd_loss --kd_temp
--distill_method --ngram_n --pseudo_dataset_path``; ``eval --ckpt_path --device``).

User errors (:class:`fastspec.UserError`: bad flags, a device this machine lacks, missing or
corrupt files, a drafter whose vocabulary does not match the target) end with a one-line
``fastspec <cmd>: error: ...`` and exit status 2; set ``FASTSPEC_DEBUG=1`` (or pass ``--debug``)
for the traceback. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from fastspec import demo, engine, introspect, report
from fastspec import eval as evaluation
from fastspec.eval import experiment
from fastspec.data import encode_prompts, encode_references, load_examples
from fastspec.distill.distributed import init_distributed, shutdown
from fastspec.distill.pseudo import PseudoSettings, SourceRecord, generate_pseudo_dataset
from fastspec.distill.students import DRAFTER_KINDS, SHORTLISTED_KINDS, TrainingError
from fastspec.distill.train_cli import (DEFAULT_MAX_STEPS, FEATURE_DATA, FEATURE_DATA_DEFAULT, FEATURE_TIME_BUDGET_S,
                                        check_feature_flags, train_from_cli)
from fastspec.drafters.feature import TRAINED_CONFIDENCE_THRESHOLD
from fastspec.drafters.io import load_drafter
from fastspec.errors import UserError
from fastspec.flags import (add_data_flags, add_drafter_dtype_flag, add_sampling_flags, add_target_flags, check_flags,
                            generation_kwargs)
from fastspec.targets import check_device, check_target_spec, load_target_and_tokenizer

DRAFTERS = ("ngram",) + DRAFTER_KINDS + ("feature",)
EXIT_USER_ERROR = 2


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
                   "(--init_from); layer_skip: fine-tune the exit head of the target's first layers")
    t.add_argument("--exp_name", required=True, help="experiment name: outputs go to <--output_root>/<exp_name>/")
    t.add_argument("--output_root", default="fastspec_out", help="parent folder of experiments")
    add_target_flags(t)
    add_data_flags(t, "train")
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
    t.add_argument("--feature_data", default=list(FEATURE_DATA_DEFAULT), nargs="+", choices=FEATURE_DATA,
                   help="feature drafter: train on the target's own outputs (--pseudo_dataset_path, else generated), "
                   "or teacher-forced references/sources/papers (no generation; papers: the full aclsum papers of the "
                   "--split's examples, up to --paper_tokens); several kinds are pooled "
                   f"(default: {' '.join(FEATURE_DATA_DEFAULT)})")
    t.add_argument("--paper_tokens", type=int, default=100_000,
                   help="feature drafter, --feature_data papers: teacher-forced paper tokens in all (256-token pieces)")
    t.add_argument("--unroll", type=int, default=3, help="feature drafter: unrolled steps (weights 0.8^i)")
    t.add_argument("--unroll_ramp", type=float, default=0.0,
                   help="feature drafter: the first fraction of the run (of --max_steps or --time_budget_s) trains "
                   "1 unrolled step only")
    t.add_argument("--shortlist", type=int, default=None,
                   help="feature/cnn/lstm/layer_skip drafters: the head scores only the N most frequent target tokens "
                   "of the training data, plus EOS (default 8192; cnn/lstm/layer_skip: 0 = the full vocabulary)")
    t.add_argument("--confidence_threshold", type=float, default=TRAINED_CONFIDENCE_THRESHOLD,
                   help="feature drafter: saved with it, so load_drafter applies it: a draft stops where the "
                   f"drafter's top probability is below it (0 = always draft γ; default {TRAINED_CONFIDENCE_THRESHOLD})")
    t.add_argument("--feature_layers", default="-1",
                   help="feature drafter: the target's hidden_states it reads, comma-separated indices "
                   "(-1 = the last layer), or 'eagle3' (layers 2, L/2, L-3 fused)")
    t.add_argument("--context_window", type=int, default=32,
                   help="feature drafter: earlier positions kept before each row's output in a training window "
                   "(-1 = whole sequences)")
    t.add_argument("--topk", type=int, default=32,
                   help="feature drafter: the target's top-k logits kept per position for the token loss")
    t.add_argument("--lr_schedule", default="constant", choices=("constant", "linear", "cosine"),
                   help="feature drafter: after warm-up, keep --lr or decay it (linear/cosine) to --min_lr_ratio × --lr")
    t.add_argument("--min_lr_ratio", type=float, default=0.1, help="feature drafter: the decayed lr's floor, × --lr")
    t.add_argument("--time_budget_s", type=float, default=None,
                   help="feature drafter: stop training after this many seconds (and at --max_steps, whichever first; "
                   f"default {FEATURE_TIME_BUDGET_S:.0f} s when --max_steps is not given either)")
    t.add_argument("--init_from", default=None, help="t5small/hf: a local HF folder to start from (the drafter model); "
                   "cnn/lstm/layer_skip: a saved drafter folder of that kind to continue (its sizes and shortlist)")
    t.add_argument("--drafter_config", default="{}",
                   help='JSON of drafter architecture options, e.g. \'{"hidden_size": 256, "num_layers": 1}\'')
    t.add_argument("--max_target_length", type=int, default=128, help="cut references to this many tokens")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--batch_size", type=int, default=8, help="global batch (split across torchrun ranks)")
    t.add_argument("--max_steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_MAX_STEPS}; feature drafter: no cap, --time_budget_s rules)")
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
    add_target_flags(p)
    add_data_flags(p, "train")
    p.add_argument("--out", required=True, help="output folder (re-running the same command resumes)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--max_target_length", type=int, default=128, help="cut stored references to this many tokens")
    add_sampling_flags(p)
    p.add_argument("--gamma", type=int, default=5, help="γ when --drafter_ckpt speeds up generation")
    p.add_argument("--drafter_ckpt", default=None, help="a drafter folder to speculate with (lossless: same outputs, faster)")
    p.add_argument("--topk_logits", type=int, default=0, help="also cache the target's top-K logits per token (0 = off)")
    p.add_argument("--no_progress", action="store_true")

    # ---- eval / demo (their flags live with them)
    for name, module, text in (("eval", evaluation, "α, τ, speed and ROUGE of drafters vs autoregressive decoding"),
                               ("demo", demo, "the whole product offline on SmolLM2 + aclsum"),
                               ("experiment", experiment, "experiments: `experiment distill` = baseline vs distilled α "
                                "for every drafter and method, with bootstrap CIs")):
        module.add_arguments(sub.add_parser(name, help=text, description=text))

    # ---- generate
    g = sub.add_parser("generate", help="text in, text out, with speculative metrics",
                       description="Summarize/complete text with the target, speculatively with a drafter.")
    add_target_flags(g)
    add_drafter_dtype_flag(g)
    g.add_argument("--text", default=None, help="the input text (default: read stdin)")
    g.add_argument("--raw", action="store_true", help="feed the text as is (no summarize:/chat template)")
    g.add_argument("--ckpt_path", default=None, help="a drafter folder saved by `fastspec train`")
    g.add_argument("--drafter", default=None, choices=("prompt_lookup", "none"),
                   help="a drafter that needs no checkpoint (default: prompt_lookup when no --ckpt_path)")
    g.add_argument("--gamma", type=int, default=5)
    g.add_argument("--max_new_tokens", type=int, default=64)
    add_sampling_flags(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text + metrics)")

    # ---- bench
    b = sub.add_parser("bench", help="interleaved speed comparison: autoregressive vs drafters (same engine)",
                       description="Ratios measured in one run: each prompt is decoded by every decoder in turn.")
    add_target_flags(b)
    add_drafter_dtype_flag(b)
    add_data_flags(b, "test")
    b.add_argument("--ckpt_path", nargs="*", default=[], metavar="[LABEL=]FOLDER", help="drafter folders to compare")
    b.add_argument("--builtin", nargs="*", default=["prompt_lookup"], choices=list(evaluation.BUILTIN_DRAFTERS))
    b.add_argument("--gamma", type=int, default=5)
    b.add_argument("--max_new_tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3, help="passes over the prompts; medians are reported")
    b.add_argument("--no_progress", action="store_true")
    return parser


# --------------------------------------------------------------------------- commands


def cmd_pseudo(args) -> int:
    info = init_distributed(args.device)
    try:
        args.device = str(info.device)
        examples = load_examples(args.dataset, split=args.split, limit=args.num_samples)
        target, tokenizer = load_target_and_tokenizer(args.target, args.device, dtype=args.dtype)
        prompts = encode_prompts(tokenizer, target, [e.source for e in examples], args.max_source_length)
        refs = encode_references(tokenizer, [e.reference for e in examples], max_target_length=args.max_target_length)
        sources = [SourceRecord(i, e.id, p, r) for i, (e, p, r) in enumerate(zip(examples, prompts, refs))]
        drafter = load_drafter(args.drafter_ckpt, target) if args.drafter_ckpt else None
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
    try:
        drafter_kwargs = json.loads(args.drafter_config)
    except json.JSONDecodeError as err:
        raise TrainingError(f"--drafter_config is not valid JSON: {err.msg}") from None
    if not isinstance(drafter_kwargs, dict):
        raise TrainingError("--drafter_config must be a JSON object")
    check_target_spec(args.target)
    if args.pseudo_dataset_path and not os.path.exists(args.pseudo_dataset_path):
        raise TrainingError(f"--pseudo_dataset_path {args.pseudo_dataset_path}: no such folder")
    if args.resume and not os.path.isdir(os.path.join(args.output_root, args.exp_name, "checkpoints")):
        raise TrainingError(f"--resume: no checkpoint in {os.path.join(args.output_root, args.exp_name)}")
    if args.drafter == "feature":
        check_feature_flags(args)
    elif args.shortlist is not None:
        if args.drafter not in SHORTLISTED_KINDS:
            raise TrainingError(f"--shortlist applies to --drafter feature/{'/'.join(SHORTLISTED_KINDS)}, "
                                f"not {args.drafter}")
        if args.shortlist < 0:
            raise TrainingError(f"--shortlist must be >= 0 (0 = the full vocabulary), got {args.shortlist}")
        drafter_kwargs["shortlist"] = args.shortlist
    return train_from_cli(args, drafter_kwargs)


def cmd_generate(args) -> int:
    text = args.text if args.text is not None else sys.stdin.read()
    if not text.strip():
        raise UserError("no input text (give --text or pipe text on stdin)")
    if args.ckpt_path and args.drafter:
        raise UserError("give either --ckpt_path or --drafter, not both")
    target, tokenizer = load_target_and_tokenizer(args.target, args.device, dtype=args.dtype)
    if args.ckpt_path:
        drafter = load_drafter(args.ckpt_path, target, args.drafter_dtype)
    elif args.drafter == "none":
        drafter = None
    else:
        drafter = evaluation.BUILTIN_DRAFTERS[args.drafter or "prompt_lookup"]()
    if args.raw:
        ids = tokenizer(text, truncation=True, max_length=args.max_source_length)["input_ids"]
    else:
        ids = encode_prompts(tokenizer, target, [text], args.max_source_length)[0]
    input_ids = torch.tensor([ids], device=introspect.model_device(target))
    out = engine.generate(target, drafter, input_ids=input_ids, gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                          **generation_kwargs(args))
    new = evaluation.new_tokens_of(out.sequences, len(ids), introspect.is_encoder_decoder(target))
    output = tokenizer.decode(new, skip_special_tokens=True).strip()
    metrics = out.metrics.as_dict()
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
    work = evaluation.load_workload(args.target, args.device, args.dataset, args.split, args.num_samples or 4,
                                    args.max_source_length, dtype=args.dtype)
    checkpoints = evaluation.parse_checkpoints(args.ckpt_path)
    decoders = evaluation.checkpoint_decoders(work.target, checkpoints, args.builtin, args.gamma, args.drafter_dtype)
    result = evaluation.compare(work.target, decoders, work.prompts, max_new_tokens=args.max_new_tokens,
                                gamma=args.gamma, generate_kwargs={"do_sample": False}, repeats=args.repeats,
                                progress=not args.no_progress, desc="bench")
    print(f"{len(work.prompts)} prompts × {args.repeats} repeats, median over repeats, "
          f"torch threads {torch.get_num_threads()}, dtype {str(introspect.model_dtype(work.target)).replace('torch.', '')}")
    print(report.text_table(result.rows, report.SPEC_COLUMNS))
    print(evaluation.agreement_table(result.rows, markdown=False))
    return evaluation.report_mismatches(result.mismatches())


COMMANDS = {
    "train": cmd_train,
    "pseudo": cmd_pseudo,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "eval": evaluation.main,
    "demo": demo.main,
    "experiment": experiment.main,
}


def run_command(args) -> int:
    """Check the flags every command shares (``--device`` first), then run the command."""
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    check_flags(args)
    return int(COMMANDS[args.command](args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Only a :class:`~fastspec.errors.UserError` becomes a one-line message (exit status 2); any
    other exception is a bug in fastspec and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FASTSPEC_DEBUG") == "1"
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print(f"fastspec {args.command}: interrupted", file=sys.stderr)
        return 130
    except UserError as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fastspec {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
