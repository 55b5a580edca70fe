"""``fastspec eval``: acceptance, speed and ROUGE of drafters against a target on a split.

The core is :func:`decode_all`, which decodes every prompt autoregressively (the same
engine with ``drafter=None``) and speculatively with each drafter, *interleaved* prompt by
prompt so that the speedups are ratios measured in one run on a noisy machine. It is
shared with ``fastspec demo`` (:mod:`fastspec.demo`).

Aggregate definitions (over all prompts of a run):

* α = Σ accepted draft tokens / Σ drafted tokens (= E[β] when γ is fixed);
* τ = (Σ accepted + Σ steps) / Σ steps: tokens emitted per target call;
* tokens/s = Σ new tokens / Σ wall time of the ``generate`` calls;
* speedup = tokens/s of the decoder / tokens/s of autoregressive decoding;
* c = drafter time per drafted token / target time per autoregressive forward, and the
  ideal speedup (1 − α^(γ+1)) / ((1 − α)(γc + 1)) of Leviathan et al. 2023. The ideal assumes
  a verification forward over γ+1 positions costs as much as one autoregressive forward;
  ``verify_cost`` reports how much more it really costs.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastspec.engine import ideal_speedup

AR_NAME = "autoregressive"
SMOLLM2 = "smollm2"  # the embedded default target (DESIGN §4)


# --------------------------------------------------------------------------- decoding


@dataclass
class Decoder:
    """A named way to decode: ``drafter=None`` is autoregressive decoding in the same engine."""

    name: str
    drafter: Any = None
    gamma: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)  # shown in reports (kind, training)
    # Another generator to compare with, e.g. HF generate: fn(input_ids [1,S], max_new_tokens, **kwargs)
    # -> sequences [1,T] like HF generate(). It reports no speculative metrics.
    generate_fn: Optional[Callable[..., torch.Tensor]] = None
    # per-decoder engine options on top of the shared ones, e.g. {"dynamic_gamma": True, "min_gamma": 1}
    options: Dict[str, Any] = field(default_factory=dict)


def hf_generate_decoder(model, name: str = "HF generate", **hf_kwargs) -> Decoder:
    """transformers' own ``model.generate`` as a decoder (``hf_kwargs``: e.g. assistant_model,
    prompt_lookup_num_tokens). Sampling is seeded through ``torch.manual_seed(seed)``."""

    def run(input_ids, max_new_tokens, seed=None, **kwargs):
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                  **hf_kwargs, **kwargs)

    return Decoder(name, generate_fn=run, info={"kind": "hf"})


@dataclass
class DecodeRun:
    """Everything one decoder produced over the prompts, with summed engine metrics."""

    name: str
    gamma: Optional[int]
    outputs: List[List[int]] = field(default_factory=list)  # new tokens per prompt
    time_s: float = 0.0
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    target_calls: int = 0
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    # decode-step forwards only (no encoder/prefill), when the engine reports them
    verify_calls: int = 0
    verify_time_s: float = 0.0
    position_accepted: List[float] = field(default_factory=list)  # Σ over prompts of rate·steps
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.time_s if self.time_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float:
        if self.num_draft_tokens == 0 or self.num_steps == 0:
            return 1.0
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps

    @property
    def per_position_acceptance(self) -> List[float]:
        return [v / self.num_steps for v in self.position_accepted] if self.num_steps else []

    def add(self, new_tokens: List[int], metrics: Dict[str, Any], wall_s: float) -> None:
        self.outputs.append(new_tokens)
        self.time_s += wall_s
        steps = int(metrics.get("num_steps", 0) or 0)
        self.num_steps += steps
        self.num_draft_tokens += int(metrics.get("num_draft_tokens", 0) or 0)
        self.num_accepted_tokens += int(metrics.get("num_accepted_tokens", 0) or 0)
        self.target_calls += int(metrics.get("target_calls", 0) or 0)
        self.draft_time_s += float(metrics.get("draft_time_s", 0.0) or 0.0)
        self.target_time_s += float(metrics.get("target_time_s", 0.0) or 0.0)
        # without the engine's own split, count every target call (prefill included) as a step
        self.verify_calls += int(metrics.get("verify_calls", metrics.get("target_calls", 0)) or 0)
        self.verify_time_s += float(metrics.get("verify_time_s", metrics.get("target_time_s", 0.0)) or 0.0)
        rates = list(metrics.get("per_position_acceptance") or [])
        if len(self.position_accepted) < len(rates):
            self.position_accepted += [0.0] * (len(rates) - len(self.position_accepted))
        for i, r in enumerate(rates):
            self.position_accepted[i] += float(r) * steps


def summarize(run: DecodeRun, reference: Optional[DecodeRun], greedy: bool) -> Dict[str, Any]:
    """One result row: α, τ, tokens/s, speedup vs the reference run, ideal speedup, identity."""
    row: Dict[str, Any] = {
        "name": run.name,
        "gamma": run.gamma,
        "num_prompts": len(run.outputs),
        "new_tokens": run.num_new_tokens,
        "time_s": run.time_s,
        "tokens_per_s": run.tokens_per_s,
        "num_steps": run.num_steps,
        "num_draft_tokens": run.num_draft_tokens,
        "num_accepted_tokens": run.num_accepted_tokens,
        "target_calls": run.target_calls,
        "acceptance_rate": run.acceptance_rate,
        "mean_accepted_length": run.mean_accepted_length if run.num_draft_tokens else None,
        "per_position_acceptance": run.per_position_acceptance,
        "draft_time_s": run.draft_time_s,
        "target_time_s": run.target_time_s,
        **run.info,
    }
    if reference is not None and reference is not run:
        row["speedup"] = run.tokens_per_s / reference.tokens_per_s
        row["identical"] = (run.outputs == reference.outputs) if greedy else None
        ar_forward_s = reference.verify_time_s / reference.verify_calls if reference.verify_calls else None
        if ar_forward_s and run.num_draft_tokens and run.acceptance_rate is not None and run.gamma:
            c = (run.draft_time_s / run.num_draft_tokens) / ar_forward_s
            row["c"] = c
            row["ideal_speedup"] = ideal_speedup(run.acceptance_rate, run.gamma, c)  # fastspec.engine's formula
            row["verify_cost"] = (run.verify_time_s / run.verify_calls) / ar_forward_s if run.verify_calls else None
            row["measured_over_ideal"] = row["speedup"] / row["ideal_speedup"]
    elif reference is run:
        row["speedup"] = 1.0
        row["identical"] = True if greedy else None
    return row


def new_tokens_of(sequences: torch.Tensor, prompt_length: int, is_encoder_decoder: bool) -> List[int]:
    """Generated tokens of row 0: drop the prompt (causal) or the decoder start token (seq2seq)."""
    row = sequences[0].tolist()
    return row[1:] if is_encoder_decoder else row[prompt_length:]


def decode_all(
    target,
    decoders: Sequence[Decoder],
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    gamma: int = 5,
    generate_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    desc: str = "decoding",
) -> Dict[str, DecodeRun]:
    """Decode every prompt (batch 1) with every decoder, interleaved prompt by prompt.

    prompts: token id lists (no padding). generate_kwargs: transformers-named controls
    (``do_sample``, ``temperature``, ``top_k``, ``seed`` ...). Returns {decoder name: run}.
    """
    from tqdm.auto import tqdm

    import fastspec

    if not decoders:
        raise ValueError("decode_all needs at least one decoder")
    names = [d.name for d in decoders]
    if len(set(names)) != len(names):
        raise ValueError(f"decoder names must be unique, got {names}")
    kwargs = dict(generate_kwargs or {})
    device = _device_of(target)
    is_encoder_decoder = bool(getattr(_config_of(target), "is_encoder_decoder", False))
    runs = {d.name: DecodeRun(d.name, None if d.drafter is None else (d.gamma or gamma), info=dict(d.info)) for d in decoders}
    bar = tqdm(total=len(prompts) * len(decoders), desc=desc, disable=not progress, unit="run")
    for prompt in prompts:
        input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        for d in decoders:
            start = time.perf_counter()
            if d.generate_fn is not None:
                sequences, metrics = d.generate_fn(input_ids, max_new_tokens, **kwargs), {}
            else:
                extra = {} if d.drafter is None else {"gamma": runs[d.name].gamma}
                out = fastspec.generate(target, d.drafter, input_ids=input_ids, max_new_tokens=max_new_tokens, **extra,
                                        **{**kwargs, **d.options})
                sequences, metrics = out.sequences, dict(out.metrics)
            wall = time.perf_counter() - start
            runs[d.name].add(new_tokens_of(sequences, input_ids.shape[1], is_encoder_decoder), metrics, wall)
            bar.update(1)
    bar.close()
    return runs


def _config_of(target):
    return getattr(target, "config", None) or getattr(getattr(target, "model", None), "config", None)


def _device_of(target) -> torch.device:
    device = getattr(target, "device", None)
    if device is None:
        try:
            device = next(target.parameters()).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- quality


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, with stemming) over the pairs."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        return {"rouge1": float("nan"), "rouge2": float("nan"), "rougeL": float("nan")}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


def decode_texts(tokenizer, outputs: Sequence[Sequence[int]]) -> List[str]:
    return [tokenizer.decode(list(o), skip_special_tokens=True).strip() for o in outputs]


# --------------------------------------------------------------------------- loading


def load_target_and_tokenizer(spec: Optional[str], device: str = "cpu", dtype: Optional[str] = None):
    """``smollm2`` (or None): the offline SmolLM2-135M-Instruct; else a local folder or hub name."""
    from fastspec import targets

    if spec in (None, "", SMOLLM2):
        model, tokenizer = targets.load_smollm2()
        model = model.to(device)
    else:
        from transformers import AutoTokenizer

        model = targets.load_target(spec, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    model.eval()
    return model, tokenizer


def encode_prompts(tokenizer, target, sources: Sequence[str], max_source_length: Optional[int] = None) -> List[List[int]]:
    """Prompt token ids (chat template / ``summarize:`` prefix) via :mod:`fastspec.data`."""
    from fastspec.data import default_max_source_length, encode_sources

    config = _config_of(target)
    limit = default_max_source_length(tokenizer, config)
    if max_source_length:
        limit = min(limit, max_source_length)
    encoded = encode_sources(
        tokenizer, sources, is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)), max_source_length=limit
    )
    return encoded.input_ids


def generation_kwargs(args) -> Dict[str, Any]:
    """transformers-named generation controls from the CLI flags."""
    kwargs: Dict[str, Any] = {"do_sample": bool(getattr(args, "do_sample", False))}
    if kwargs["do_sample"]:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return kwargs


def parse_checkpoints(specs: Sequence[str]) -> List[tuple]:
    """``[label=]path`` entries -> [(label, path)]; the label defaults to the folder name."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        if not os.path.isdir(path):
            raise ValueError(f"--ckpt_path {path!r}: no such drafter folder")
        out.append((label, path))
    labels = [l for l, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--ckpt_path labels must be unique (use label=path): {labels}")
    return out


def describe_checkpoint(path: str) -> Dict[str, Any]:
    """The drafter kind and how it was trained (baseline vs distilled), read from config.json."""
    from fastspec.drafters.io import read_config

    meta = read_config(path)
    config = meta.get("config", {})
    training = config.get("training", {}) if isinstance(config.get("training"), dict) else {}
    method = training.get("distill_method") or config.get("distill_method")
    kd = training.get("kd_loss", config.get("kd_loss"))
    if method or kd:
        trained = f"distilled ({method or 'kd'})"
    elif training or config.get("trained_on"):
        trained = "baseline"
    else:
        trained = config.get("trained_on") or "–"
    return {"kind": meta["kind"], "training": trained}


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``fastspec eval`` flags (the CLI calls this, then :func:`main`)."""
    parser.add_argument("--ckpt_path", nargs="+", default=[], metavar="[LABEL=]FOLDER",
                        help="drafter folder(s) saved by `fastspec train` (config.json + weights); "
                        "give several to compare baseline vs distilled")
    parser.add_argument("--builtin", nargs="*", default=[], choices=["prompt_lookup"],
                        help="drafters that need no checkpoint, evaluated beside the checkpoints")
    parser.add_argument("--device", default="cpu", help="torch device for target and drafters (cpu, cuda, cuda:1)")
    parser.add_argument("--target", default=SMOLLM2, help="'smollm2' (offline default), a local HF folder or a hub name")
    parser.add_argument("--dataset", default="aclsum", help="'aclsum[:section[:aspects]]' or a CNN/DailyMail path")
    parser.add_argument("--split", default="test", help="data split (train/val/test)")
    parser.add_argument("--num_samples", type=int, default=20, help="number of prompts from the split")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_source_length", type=int, default=1024, help="truncate prompts to this many tokens")
    parser.add_argument("--gamma", type=int, default=5, help="draft tokens per step (γ)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fastspec_eval", help="folder for results.json, report.md and plots")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def evaluate(
    target,
    tokenizer,
    decoders: Sequence[Decoder],
    prompts: Sequence[Sequence[int]],
    references: Optional[Sequence[str]],
    *,
    max_new_tokens: int,
    gamma: int,
    generate_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Autoregressive + every decoder on the prompts: result rows with α, τ, speed and ROUGE."""
    gen = dict(generate_kwargs or {})
    greedy = not gen.get("do_sample", False)
    all_decoders = [Decoder(AR_NAME)] + [d for d in decoders if d.name != AR_NAME]
    runs = decode_all(target, all_decoders, prompts, max_new_tokens=max_new_tokens, gamma=gamma,
                      generate_kwargs=gen, progress=progress, desc="eval")
    ar = runs[AR_NAME]
    rows = []
    for d in all_decoders:
        row = summarize(runs[d.name], ar, greedy)
        if references is not None and tokenizer is not None:
            row.update(rouge_scores(decode_texts(tokenizer, runs[d.name].outputs), references))
        rows.append(row)
    return {"rows": rows, "runs": runs, "greedy": greedy}


EVAL_EXTRA_COLUMNS = ("kind", "training")


def write_eval_report(result: Dict[str, Any], out_dir: str, settings: Dict[str, Any]) -> Dict[str, str]:
    """results.json, report.md, per_position_acceptance.png and alpha.png in ``out_dir``."""
    from fastspec import report

    os.makedirs(out_dir, exist_ok=True)
    rows = result["rows"]
    spec_rows = [r for r in rows if r["name"] != AR_NAME]
    files = {
        "json": report.write_json({"settings": settings, "rows": rows}, os.path.join(out_dir, "results.json")),
        "per_position": report.plot_per_position_acceptance(
            {r["name"]: r["per_position_acceptance"] for r in spec_rows},
            os.path.join(out_dir, "per_position_acceptance.png")),
        "alpha": report.plot_bars(
            {r["name"]: {r.get("training") or "α": r["acceptance_rate"] or 0.0} for r in spec_rows},
            os.path.join(out_dir, "alpha.png"), ylabel="α (acceptance rate)", title="α per drafter"),
    }
    columns = list(report.SPEC_COLUMNS)
    columns[1:1] = [report.Column("kind", "kind", lambda v: v or "–"), report.Column("training", "training", lambda v: v or "–")]
    rouge_columns = [report.Column("name", "decoder")] + [
        report.Column(k, k.upper().replace("ROUGE", "ROUGE-"), report.fmt_float(4)) for k in ("rouge1", "rouge2", "rougeL")
    ]
    sections = [
        ("Settings", report.summarize_settings(settings)),
        ("Acceptance and speed", report.markdown_table(rows, columns)),
    ]
    if rows and "rouge1" in rows[0]:
        sections.append(("ROUGE (F1)", report.markdown_table(rows, rouge_columns)))
    sections.append(("Plots", "![per-position acceptance](per_position_acceptance.png)\n\n![alpha](alpha.png)"))
    files["markdown"] = report.write_markdown(os.path.join(out_dir, "report.md"), "fastspec eval", sections)
    return files


def main(args) -> int:
    """Run ``fastspec eval``; returns the exit status (1 when greedy outputs differ from AR)."""
    from fastspec import report
    from fastspec.data import load_examples
    from fastspec.cli import _load_drafter_folder

    if args.gamma < 1:
        raise ValueError(f"--gamma must be >= 1, got {args.gamma}")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ValueError("--num_samples and --max_new_tokens must be >= 1")
    checkpoints = parse_checkpoints(args.ckpt_path)
    if not checkpoints and not args.builtin:
        raise ValueError("nothing to evaluate: give --ckpt_path FOLDER [FOLDER ...] and/or --builtin prompt_lookup")
    target, tokenizer = load_target_and_tokenizer(args.target, args.device)
    decoders = []
    for label, path in checkpoints:
        drafter = _load_drafter_folder(path, target)  # checks the vocabulary against the target
        if hasattr(drafter, "to"):
            drafter = drafter.to(args.device) or drafter
        decoders.append(Decoder(label, drafter, args.gamma, describe_checkpoint(path)))
    for name in args.builtin:
        from fastspec.drafters import PromptLookupDrafter

        decoders.append(Decoder(name, PromptLookupDrafter(), args.gamma, {"kind": name, "training": "none"}))
    examples = load_examples(args.dataset, split=args.split, limit=args.num_samples)
    prompts = encode_prompts(tokenizer, target, [e.source for e in examples], args.max_source_length)
    references = [e.reference for e in examples] if all(e.reference for e in examples) else None
    result = evaluate(target, tokenizer, decoders, prompts, references, max_new_tokens=args.max_new_tokens,
                      gamma=args.gamma, generate_kwargs=generation_kwargs(args), progress=not args.no_progress)
    settings = {
        "target": args.target, "dataset": args.dataset, "split": args.split, "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "gamma": args.gamma, "device": args.device,
        "decoding": "sampling" if args.do_sample else "greedy", "torch_threads": torch.get_num_threads(),
        "checkpoints": {label: path for label, path in checkpoints},
    }
    files = write_eval_report(result, args.out, settings)
    columns = list(report.SPEC_COLUMNS)
    columns[1:1] = [report.Column("training", "training", lambda v: v or "–")]
    print(report.text_table(result["rows"], columns))
    print(f"\nreport: {files['markdown']}\njson:   {files['json']}")
    bad = [r["name"] for r in result["rows"] if r.get("identical") is False]
    if bad:
        print(f"ERROR: greedy outputs differ from autoregressive decoding for: {', '.join(bad)}")
        return 1
    return 0
