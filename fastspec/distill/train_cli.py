"""``fastspec train``: load the target and the data, then train the chosen drafter (the trainer of
:mod:`fastspec.distill.trainer`, or the feature drafter of :mod:`fastspec.distill.feature`)."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import List, Optional, Sequence, Tuple

from fastspec import introspect
from fastspec.data import encode_prompts, encode_references, load_aclsum_papers, load_examples
from fastspec.distill.distributed import init_distributed, shutdown
from fastspec.distill.feature import FeatureTrainConfig, pseudo_pairs, train_feature_drafter
from fastspec.distill.feature_data import text_chunk_pairs
from fastspec.distill.losses import DIVERGENCES
from fastspec.distill.pseudo import load_pseudo_dataset
from fastspec.distill.students import TrainingError
from fastspec.distill.trainer import TrainConfig, stamp_training, train_drafter
from fastspec.drafters.feature import _num_decoder_layers as num_decoder_layers
from fastspec.drafters.feature import eagle3_layers
from fastspec.files import atomic_write_text
from fastspec.targets import load_target_and_tokenizer


def reference_records(args, target, tokenizer) -> List[dict]:
    """The ``--dataset``/``--split`` examples as training records: encoded source and reference."""
    examples = load_examples(args.dataset, split=args.split, limit=args.num_samples)
    prompts = encode_prompts(tokenizer, target, [e.source for e in examples], args.max_source_length)
    refs = encode_references(tokenizer, [e.reference for e in examples], max_target_length=args.max_target_length)
    return [{"index": i, "id": e.id, "source_ids": p, "reference_ids": r}
            for i, (e, p, r) in enumerate(zip(examples, prompts, refs))]


FEATURE_DATA = ("pseudo", "references", "sources", "papers")
FEATURE_DATA_DEFAULT = ("pseudo", "references", "papers")
DEFAULT_MAX_STEPS = 200  # every drafter but the feature one, whose run is bounded by time
FEATURE_TIME_BUDGET_S = 900.0


def feature_pairs(target, records: Sequence[dict], kind: str, *, max_new_tokens: int, progress: bool = False,
                  tokenizer=None, paper_tokens: int = 100_000):
    """(prompt, output) token pairs for ``fastspec train --drafter feature --feature_data KIND``.

    pseudo: the records' ``output_ids`` (a pseudo-dataset), else the target's own greedy outputs,
    generated here (≤ ``max_new_tokens``); references: the reference texts, teacher-forced, no
    generation; sources: the source texts themselves (causal: the prompt continues its first token;
    seq2seq: the decoder reads the source), the cheapest in-domain text; papers: the full aclsum
    papers of the records (the training split's only, so no test text leaks in), cut into 256-token
    pieces, ≤ ``paper_tokens`` tokens in all.
    """
    if kind not in FEATURE_DATA:
        raise TrainingError(f"--feature_data must be one of {FEATURE_DATA}, not {kind!r}")
    seq2seq = introspect.is_encoder_decoder(introspect.hf_model(target))
    if kind == "papers":
        texts = {e.id: e.source for e in load_aclsum_papers(ids=[str(r.get("id")) for r in records])}
        ids = [r.get("id") for r in records if r.get("id") in texts]
        if not ids:
            raise TrainingError("--feature_data papers reads the aclsum papers of the training examples; "
                                "these records are not aclsum examples")
        return text_chunk_pairs(tokenizer, [texts[i] for i in ids], budget=paper_tokens, seq2seq=seq2seq)
    sources = [list(r["source_ids"]) for r in records]
    if kind == "pseudo":
        if all(r.get("output_ids") for r in records):
            return [(s, list(r["output_ids"])) for s, r in zip(sources, records)]
        return pseudo_pairs(target, sources, max_new_tokens=max_new_tokens, progress=progress)
    if kind == "references":
        if not all(r.get("reference_ids") for r in records):
            raise TrainingError("--feature_data references: some records have no reference text")
        return [(s, list(r["reference_ids"])) for s, r in zip(sources, records)]
    if seq2seq:
        return [(s, s) for s in sources]
    return [(s[:1], s[1:]) for s in sources if len(s) > 1]


def check_feature_flags(args) -> None:
    """``fastspec train --drafter feature``'s own flags, checked before anything loads (one-line errors)."""
    if args.distill_method not in DIVERGENCES:
        raise TrainingError(f"--drafter feature takes --distill_method {'/'.join(DIVERGENCES)}, "
                            f"not {args.distill_method!r}")
    if args.unroll < 1:
        raise TrainingError(f"--unroll must be >= 1, got {args.unroll}")
    if args.shortlist is not None and args.shortlist < 1:
        raise TrainingError(f"--shortlist must be >= 1 for the feature drafter, got {args.shortlist}")
    if args.context_window < -1:
        raise TrainingError(f"--context_window must be >= 0, or -1 for whole sequences, got {args.context_window}")
    if args.topk < 1:
        raise TrainingError(f"--topk must be >= 1, got {args.topk}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise TrainingError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0.0 <= args.unroll_ramp < 1.0:
        raise TrainingError(f"--unroll_ramp must be in [0, 1), got {args.unroll_ramp}")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        raise TrainingError(f"--time_budget_s must be > 0, got {args.time_budget_s}")
    if not 0.0 <= args.confidence_threshold < 1.0:
        raise TrainingError(f"--confidence_threshold must be in [0, 1), got {args.confidence_threshold}")
    parse_feature_layers(args.feature_layers, None)


def parse_feature_layers(spec: str, num_layers: Optional[int]) -> Tuple[int, ...]:
    """``--feature_layers``: "eagle3" (needs ``num_layers``; None only checks the spelling) or
    comma-separated hidden_states indices."""
    text = str(spec).strip().lower()
    if text == "eagle3":
        return eagle3_layers(num_layers) if num_layers is not None else ()
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise TrainingError(f"--feature_layers {spec!r}: give comma-separated layer indices (e.g. -1 or 2,15,27) "
                            "or 'eagle3'") from None
    if len(set(layers)) != len(layers):
        raise TrainingError(f"--feature_layers {spec!r}: a layer is repeated")
    if num_layers is not None and any(not -(num_layers + 1) <= i <= num_layers for i in layers):
        raise TrainingError(f"--feature_layers {spec!r}: the target's hidden_states are indexed "
                            f"{-(num_layers + 1)}..{num_layers} ({num_layers} layers)")
    return layers


def train_feature_from_cli(args, target, tokenizer) -> int:
    """``fastspec train --drafter feature``: the EAGLE-style drafter of :mod:`fastspec.distill.feature`.

    Data (``--feature_data``, default pseudo; several kinds are pooled): the target's own outputs
    (``--pseudo_dataset_path`` or generated here, ≤ ``--max_target_length`` tokens), references or
    sources, cut by ``--num_samples``. Loss per unrolled step i (``--unroll``, weight 0.8^i): ``--loss`` × smooth L1
    on the features + w × ``--distill_method`` (fkl/rkl/jsd/tvd) at ``--kd_temp`` against the
    target's distribution on the ``--shortlist`` head, with w = ``--kd_loss`` when > 0, else EAGLE's
    0.1. Drafter and schedule: ``--feature_layers`` (indices or eagle3), ``--topk`` teacher logits,
    ``--context_window`` (training windows), ``--lr_schedule``/``--min_lr_ratio``, ``--unroll_ramp``,
    ``--time_budget_s``; the saved drafter's training metadata records them all. Checkpoints
    (atomic) in ``<out>/checkpoints``; ``--resume`` continues from the newest, a run without it
    starts over. Pairs and features are cached in ``<out>`` for the rerun.
    """
    check_feature_flags(args)
    max_steps, time_budget_s = args.max_steps, args.time_budget_s
    if max_steps is None and time_budget_s is None:
        time_budget_s = FEATURE_TIME_BUDGET_S
    layers = parse_feature_layers(args.feature_layers, num_decoder_layers(introspect.hf_model(target)))
    shortlist = FeatureTrainConfig.shortlist_size if args.shortlist is None else args.shortlist
    context_window = None if args.context_window < 0 else args.context_window
    out_dir = os.path.join(args.output_root, args.exp_name)
    ckpt_dir, pairs_file = os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "feature_pairs.json")
    if not args.resume:
        for stale in (ckpt_dir, os.path.join(out_dir, "feature_data")):
            shutil.rmtree(stale, ignore_errors=True)
    started = time.perf_counter()
    kinds = list(dict.fromkeys(args.feature_data))  # pooled, each kind once
    if args.resume and os.path.isfile(pairs_file):
        with open(pairs_file, encoding="utf-8") as handle:
            pairs = [tuple(p) for p in json.load(handle)]
    else:
        if args.pseudo_dataset_path:
            records = load_pseudo_dataset(args.pseudo_dataset_path)[: args.num_samples or None]
        else:
            records = reference_records(args, target, tokenizer)
        pairs = [pair for kind in kinds for pair in feature_pairs(
            target, records, kind, max_new_tokens=args.max_target_length, progress=not args.no_progress,
            tokenizer=tokenizer, paper_tokens=args.paper_tokens)]
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(pairs_file, json.dumps([[list(p), list(o)] for p, o in pairs]))
    if not pairs:
        raise TrainingError("no training sequences for the feature drafter")
    config = FeatureTrainConfig(
        feature_layers=layers, shortlist_size=shortlist, topk=args.topk, unroll_steps=args.unroll,
        unroll_ramp=args.unroll_ramp, context_window=context_window, lr_schedule=args.lr_schedule,
        min_lr_ratio=args.min_lr_ratio, time_budget_s=time_budget_s, feature_weight=args.loss,
        divergence=args.distill_method, divergence_weight=args.kd_loss if args.kd_loss > 0 else 0.1,
        temperature=args.kd_temp, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, batch_size=args.batch_size, max_steps=max_steps,
        max_length=args.max_source_length + args.max_target_length, data_cache_dir=os.path.join(out_dir, "feature_data"),
        checkpoint_dir=ckpt_dir, checkpoint_every=args.ckpt_every or max_steps or DEFAULT_MAX_STEPS, seed=args.seed,
        progress=not args.no_progress)
    drafter = train_feature_drafter(target, pairs, config)
    drafter.confidence_threshold = args.confidence_threshold
    folder = os.path.join(out_dir, "drafter")
    drafter.save(folder)
    meta = {"drafter": "feature", "feature_data": kinds, "pseudo_dataset": args.pseudo_dataset_path,
            "loss": args.loss, "kd_loss": config.divergence_weight, "distill_method": args.distill_method,
            "kd_temp": args.kd_temp, "unroll": args.unroll, "unroll_ramp": args.unroll_ramp,
            "shortlist": drafter.train_stats["shortlist_size"], "feature_layers": list(layers), "topk": args.topk,
            "context_window": context_window, "lr": args.lr, "lr_schedule": args.lr_schedule,
            "min_lr_ratio": args.min_lr_ratio, "time_budget_s": time_budget_s, "paper_tokens": args.paper_tokens,
            "confidence_threshold": args.confidence_threshold,
            "steps": drafter.train_stats["steps"], "seconds": round(drafter.train_stats["seconds"], 1),
            "final_loss": drafter.train_stats["final_loss"]}
    stamp_training(folder, meta)
    print(f"drafter saved to {folder} ({len(pairs)} sequences, {drafter.train_stats['steps']} steps, "
          f"loss {drafter.train_stats['final_loss']:.4f}, {time.perf_counter() - started:.1f}s)")
    return 0


def train_from_cli(args, drafter_options: dict) -> int:
    """``fastspec train``: load target + data, train, save ``<output_root>/<exp_name>/drafter``."""
    out_dir = os.path.join(args.output_root, args.exp_name)
    config = TrainConfig(
        out_dir=out_dir, drafter=args.drafter, batch_size=args.batch_size, lr=args.lr,
        max_steps=DEFAULT_MAX_STEPS if args.max_steps is None else args.max_steps,
        weight_decay=args.weight_decay, optimizer=args.optimizer, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, loss=args.loss, kd_loss=args.kd_loss, kd_temp=args.kd_temp,
        distill_method=args.distill_method, on_policy_divergence=args.on_policy_divergence,
        on_policy_max_new_tokens=args.on_policy_max_new_tokens, teacher_logits=args.teacher_logits, seed=args.seed,
        ckpt_every=args.ckpt_every, eval_every=args.eval_every, amp=args.amp, progress=not args.no_progress,
    )
    config.validate()
    info = init_distributed(args.device)
    try:
        target, tokenizer = load_target_and_tokenizer(args.target, str(info.device), dtype=getattr(args, "dtype", None))
        if args.drafter == "feature":
            return train_feature_from_cli(args, target, tokenizer)
        if args.pseudo_dataset_path:
            records = load_pseudo_dataset(args.pseudo_dataset_path)
            if args.num_samples:
                records = records[: args.num_samples]
        else:
            if args.drafter != "ngram" and config.kd_loss > 0 and config.distill_method == "seq_kd":
                raise TrainingError("--distill_method seq_kd needs --pseudo_dataset_path")
            records = reference_records(args, target, tokenizer)
        if args.drafter == "ngram" and config.kd_loss > 0 and not any(r.get("output_ids") for r in records):
            raise TrainingError("a distilled n-gram drafter (--kd_loss > 0) is fitted on target outputs: give --pseudo_dataset_path")
        eval_prompts = None
        if args.eval_samples and args.drafter != "ngram":
            val_spec = "aclsum" if args.dataset.startswith("aclsum_papers") else args.dataset
            val = load_examples(val_spec, split="val", limit=args.eval_samples)
            eval_prompts = encode_prompts(tokenizer, target, [e.source for e in val], args.max_source_length)
        started = time.perf_counter()
        train_drafter(target, records, config, progress=config.progress, init_from=args.init_from,
                      drafter_options=drafter_options, dist_info=info, pseudo_dir=args.pseudo_dataset_path,
                      eval_prompts=eval_prompts, gamma=args.gamma, eval_max_new_tokens=args.eval_max_new_tokens,
                      resume=args.resume, ngram_n=args.ngram_n)
        if info.is_main:
            print(f"drafter saved to {os.path.join(out_dir, 'drafter')} ({time.perf_counter() - started:.1f}s)")
    finally:
        shutdown()
    return 0
