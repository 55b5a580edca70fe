"""``fastspec eval`` and the one comparison path that ``fastspec bench``, ``fastspec eval`` and
``fastspec demo`` share: load the target → encode the prompts → build the decoders →
:func:`decode_all` → :func:`summarize`.

:func:`decode_all` decodes every prompt autoregressively (the same engine with
``drafter=None``) and speculatively with each drafter, *interleaved* prompt by prompt so that
the speedups are ratios measured in one run on a noisy machine. Each decoder's
:class:`~fastspec.metrics.GenerationMetrics` are summed over the prompts, and α, τ,
per-position acceptance, c and the ideal speedup are read from the merged sums (defined once,
in :mod:`fastspec.metrics`). On top of them a row reports:

* tokens/s = Σ new tokens / Σ wall time of the ``generate`` calls;
* speedup = tokens/s of the decoder / tokens/s of autoregressive decoding;
* verify_cost = the time of one verification forward (γ+1 positions) / that of one
  autoregressive decode step: the ideal speedup assumes 1;
* agreement with autoregressive decoding (greedy only, :func:`record_agreement`): token agreement,
  the first divergence per prompt, and whether each divergence sat at a near-tie of the target
  (``divergence_near_tie``, with the largest ``divergence_gap`` and the ``near_tie_tolerance``).
  In fp32 speculation must be identical; in bf16/fp16 a (γ+1)-token forward rounds differently
  from a 1-token one, so outputs may part at near-ties, and only a divergence that is *not* a
  near-tie is a bug (:meth:`Comparison.mismatches`, ``compare(strict=True)``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastspec import engine, introspect, precision, report
from fastspec.data import Example, encode_prompts, load_examples
from fastspec.drafters import PromptLookupDrafter
from fastspec.distill.replay import replay_runs
from fastspec.drafters.io import load_drafter, read_config
from fastspec.errors import UserError
from fastspec.metrics import GenerationMetrics
from fastspec.flags import (add_data_flags, add_drafter_dtype_flag, add_sampling_flags, add_target_flags,  # noqa: F401
                            check_flags, generation_kwargs)
from fastspec.report import agreement_table
from fastspec.targets import load_target_and_tokenizer

AR_NAME = "autoregressive"
BUILTIN_DRAFTERS = {"prompt_lookup": PromptLookupDrafter}  # drafters that need no checkpoint


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
    """Everything one decoder produced over the prompts, with the engine metrics summed."""

    name: str
    gamma: Optional[int]
    outputs: List[List[int]] = field(default_factory=list)  # new tokens per prompt
    time_s: float = 0.0
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.time_s if self.time_s > 0 else float("nan")

    def add(self, new_tokens: List[int], metrics: Optional[GenerationMetrics], wall_s: float) -> None:
        """One prompt's output; ``metrics`` None for generators that report none (HF generate)."""
        self.outputs.append(new_tokens)
        self.time_s += wall_s
        if metrics is not None:
            self.metrics = self.metrics + metrics


def _per_verify_s(metrics: GenerationMetrics) -> Optional[float]:
    return metrics.verify_time_s / metrics.verify_calls if metrics.verify_calls else None


def summarize(run: DecodeRun, reference: Optional[DecodeRun], greedy: bool) -> Dict[str, Any]:
    """One result row: α, τ, c, ideal speedup (from the merged metrics), tokens/s, speedup vs
    the reference run and whether the outputs are identical to it."""
    m = run.metrics
    speculative = m.row_steps > 0
    row: Dict[str, Any] = {
        "name": run.name,
        "gamma": run.gamma,
        "num_prompts": len(run.outputs),
        "new_tokens": run.num_new_tokens,
        "time_s": run.time_s,
        "tokens_per_s": run.tokens_per_s,
        "num_steps": m.num_steps,
        "row_steps": m.row_steps,  # steps that verified drafts: the denominator of α and τ
        "num_draft_tokens": m.num_draft_tokens,
        "num_accepted_tokens": m.num_accepted_tokens,
        "target_calls": m.target_calls,
        "verify_calls": m.verify_calls,
        "acceptance_rate": m.acceptance_rate if speculative else None,
        "mean_accepted_length": m.mean_accepted_length if speculative else None,
        "per_position_acceptance": m.per_position_acceptance if speculative else [],
        "c": m.c if speculative else None,
        "ideal_speedup": m.ideal_speedup if speculative else None,
        "draft_time_s": m.draft_time_s,
        "target_time_s": m.target_time_s,
        # agreement with autoregressive decoding (None when not compared: sampling)
        "token_agreement": m.token_agreement,
        "divergences": m.divergences if m.compared_tokens else None,
        "first_divergence": m.first_divergence,
        "divergence_positions": list(m.divergence_positions),
        "divergence_near_tie": m.divergence_near_tie,
        "divergence_gap": m.divergence_gap,
        **run.info,
    }
    if reference is run:
        row["speedup"] = 1.0
        row["identical"] = True if greedy else None
    elif reference is not None:
        row["speedup"] = run.tokens_per_s / reference.tokens_per_s
        row["identical"] = (run.outputs == reference.outputs) if greedy else None
        ours, theirs = _per_verify_s(m), _per_verify_s(reference.metrics)
        row["verify_cost"] = ours / theirs if ours and theirs else None
        if row["ideal_speedup"]:
            row["measured_over_ideal"] = row["speedup"] / row["ideal_speedup"]
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

    if not decoders:
        raise ValueError("decode_all needs at least one decoder")
    names = [d.name for d in decoders]
    if len(set(names)) != len(names):
        raise ValueError(f"decoder names must be unique, got {names}")
    kwargs = dict(generate_kwargs or {})
    model = introspect.hf_model(target)
    device, seq2seq = introspect.model_device(model), introspect.is_encoder_decoder(model)
    runs = {d.name: DecodeRun(d.name, None if d.drafter is None else (d.gamma or gamma), info=dict(d.info)) for d in decoders}
    bar = tqdm(total=len(prompts) * len(decoders), desc=desc, disable=not progress, unit="run")
    for prompt in prompts:
        input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        for d in decoders:
            start = time.perf_counter()
            if d.generate_fn is not None:
                sequences, metrics = d.generate_fn(input_ids, max_new_tokens, **kwargs), None
            else:
                extra = {} if d.drafter is None else {"gamma": runs[d.name].gamma}
                out = engine.generate(target, d.drafter, input_ids=input_ids, max_new_tokens=max_new_tokens, **extra,
                                      **{**kwargs, **d.options})
                sequences, metrics = out.sequences, out.metrics
            wall = time.perf_counter() - start
            runs[d.name].add(new_tokens_of(sequences, input_ids.shape[1], seq2seq), metrics, wall)
            bar.update(1)
    bar.close()
    return runs


def near_tie_tolerance(target) -> float:
    """The top-2 logit gap under which a divergence counts as a near-tie, for the target's dtype."""
    return precision.NEAR_TIE_TOLERANCE.get(introspect.model_dtype(introspect.hf_model(target)), 1e-3)


def record_agreement(target, runs: Dict[str, DecodeRun], prompts: Sequence[Sequence[int]], reference: str = AR_NAME,
                     tolerance: Optional[float] = None) -> None:
    """Add to every run's metrics its agreement with the ``reference`` run (greedy outputs on the
    same prompts): tokens reproduced before the first divergence and, at a divergence, the target's
    logit gap there (:func:`fastspec.precision.check_divergence`): a near-tie or not."""
    model = introspect.hf_model(target)
    device, seq2seq = introspect.model_device(model), introspect.is_encoder_decoder(model)
    inputs = {"decoder_start_token_id": introspect.decoder_start_token_id(model)} if seq2seq else {}
    tolerance = near_tie_tolerance(target) if tolerance is None else tolerance
    for run in runs.values():
        counts = GenerationMetrics()
        for prompt, ours, theirs in zip(prompts, run.outputs, runs[reference].outputs):
            agreeing, compared = precision.token_agreement(theirs, ours)
            found = None
            if agreeing < compared or len(ours) != len(theirs):
                ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
                found = precision.check_divergence(model, theirs, ours, tolerance=tolerance, input_ids=ids, **inputs)
            counts.record_divergence(agreeing, compared, *((found.position, found.gap, found.near_tie) if found else ()))
        run.metrics = run.metrics + counts


class DivergenceError(AssertionError):
    """A greedy output parted from autoregressive decoding where the target had no near-tie: a bug."""


# --------------------------------------------------------------------------- the shared comparison


@dataclass
class Workload:
    """A loaded target, its tokenizer and the prompts every decoder decodes."""

    target: Any
    tokenizer: Any
    examples: List[Example]
    prompts: List[List[int]]
    max_source_length: Optional[int] = None

    def encode(self, sources: Sequence[str]) -> List[List[int]]:
        """More prompts for the same target (e.g. training sources), encoded the same way."""
        return encode_prompts(self.tokenizer, self.target, sources, self.max_source_length)

    @property
    def references(self) -> Optional[List[str]]:
        return [e.reference for e in self.examples] if all(e.reference for e in self.examples) else None


def load_workload(target_spec: Optional[str], device: str, dataset: str, split: str, num_samples: Optional[int],
                  max_source_length: Optional[int], dtype=None) -> Workload:
    """Load the target (``dtype``: a name incl. "auto", or a torch dtype; None keeps the checkpoint's)
    and encode the first ``num_samples`` examples of ``dataset``/``split``."""
    target, tokenizer = load_target_and_tokenizer(target_spec, device, dtype=dtype)
    examples = load_examples(dataset, split=split, limit=num_samples)
    prompts = encode_prompts(tokenizer, target, [e.source for e in examples], max_source_length)
    return Workload(target, tokenizer, examples, prompts, max_source_length)


def checkpoint_decoders(target, checkpoints: Sequence[tuple], builtins: Sequence[str], gamma: int,
                        drafter_dtype=None) -> List[Decoder]:
    """A decoder per saved drafter (``(label, folder)``, loaded and checked against ``target``; in
    ``drafter_dtype``, default the target's, see :func:`~fastspec.drafters.io.load_drafter`) and per
    built-in drafter name (:data:`BUILTIN_DRAFTERS`)."""
    decoders = [Decoder(label, load_drafter(path, target, drafter_dtype), gamma, describe_checkpoint(path))
                for label, path in checkpoints]
    for name in builtins:
        if name not in BUILTIN_DRAFTERS:
            raise UserError(f"unknown built-in drafter {name!r}; choose from {', '.join(BUILTIN_DRAFTERS)}")
        decoders.append(Decoder(name, BUILTIN_DRAFTERS[name](), gamma, {"kind": name, "training": "none"}))
    return decoders


@dataclass
class Comparison:
    rows: List[Dict[str, Any]]  # one per decoder, autoregressive first
    runs: Dict[str, DecodeRun]  # of the last repeat
    greedy: bool
    exact: bool = True  # fp32/fp64 target: greedy outputs must be identical to autoregressive decoding
    tolerance: Optional[float] = None  # near-tie tolerance used for the divergences

    def mismatches(self) -> List[str]:
        """Decoders whose greedy outputs betray a lossless bug: any difference from autoregressive
        decoding in fp32; in bf16/fp16 a divergence that is not a near-tie of the target."""
        return [r["name"] for r in self.rows if mismatch(r, self.exact)]

    def check_agreement(self) -> None:
        """Raise :class:`DivergenceError` naming the :meth:`mismatches`, if any."""
        bad = [r for r in self.rows if mismatch(r, self.exact)]
        if bad:
            raise DivergenceError("greedy outputs part from autoregressive decoding without a near-tie: " + "; ".join(
                f"{r['name']} (first at {r.get('first_divergence')}, gap {r.get('divergence_gap')}, "
                f"tolerance {r.get('near_tie_tolerance')})" for r in bad))


def mismatch(row: Dict[str, Any], exact: bool = True) -> bool:
    """A row whose greedy outputs betray a bug (see :meth:`Comparison.mismatches`)."""
    if row.get("identical") is not False:
        return False
    return exact or row.get("divergence_near_tie") is not True


def compare(target, decoders: Sequence[Decoder], prompts: Sequence[Sequence[int]], *, max_new_tokens: int, gamma: int,
            generate_kwargs: Optional[Dict[str, Any]] = None, repeats: int = 1, progress: bool = True,
            desc: str = "decoding", strict: bool = False, tolerance: Optional[float] = None) -> Comparison:
    """Autoregressive decoding + every decoder on the prompts, ``repeats`` times: one row per decoder
    against autoregressive decoding; speedup and tokens/s are medians over the repeats.

    Greedy: each row also carries its agreement with autoregressive decoding (of the last repeat,
    :func:`record_agreement`; ``tolerance`` defaults to the target dtype's near-tie tolerance).
    ``strict``: raise :class:`DivergenceError` when a decoder parts from it without a near-tie
    (in fp32: at all)."""
    if repeats < 1 or gamma < 1 or max_new_tokens < 1:
        raise UserError("--repeats, --gamma and --max_new_tokens must be >= 1")
    gen = dict(generate_kwargs or {})
    greedy = not gen.get("do_sample", False)
    all_decoders = [Decoder(AR_NAME)] + [d for d in decoders if d.name != AR_NAME]
    tolerance = near_tie_tolerance(target) if tolerance is None else float(tolerance)
    per_repeat = []
    for repeat in range(repeats):
        runs = decode_all(target, all_decoders, prompts, max_new_tokens=max_new_tokens, gamma=gamma,
                          generate_kwargs=gen, progress=progress, desc=desc)
        if greedy and repeat == repeats - 1:
            record_agreement(target, runs, prompts, AR_NAME, tolerance)
        per_repeat.append([summarize(runs[d.name], runs[AR_NAME], greedy) for d in all_decoders])
    rows = per_repeat[-1]
    for i, row in enumerate(rows):
        for key in ("speedup", "tokens_per_s"):
            values = [r[i][key] for r in per_repeat if r[i].get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        row["near_tie_tolerance"] = tolerance if greedy else None
    exact = introspect.model_dtype(introspect.hf_model(target)) in (torch.float32, torch.float64)
    result = Comparison(rows, runs, greedy, exact, tolerance)
    if strict:
        result.check_agreement()
    return result


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


# --------------------------------------------------------------------------- checkpoints


def parse_checkpoints(specs: Sequence[str]) -> List[tuple]:
    """``[label=]path`` entries -> [(label, path)]; the label defaults to the folder name."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        if not os.path.isdir(path):
            raise UserError(f"--ckpt_path {path!r}: no such drafter folder")
        out.append((label, path))
    labels = [l for l, _ in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"--ckpt_path labels must be unique (use label=path): {labels}")
    return out


def describe_checkpoint(path: str) -> Dict[str, Any]:
    """The drafter kind and how it was trained (baseline vs distilled), read from config.json."""
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
    parser.add_argument("--builtin", nargs="*", default=[], choices=list(BUILTIN_DRAFTERS),
                        help="drafters that need no checkpoint, evaluated beside the checkpoints")
    add_target_flags(parser, max_source_length=1024)
    add_drafter_dtype_flag(parser)
    add_data_flags(parser, "test", num_samples=20)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=5, help="draft tokens per step (γ)")
    add_sampling_flags(parser)
    parser.add_argument("--out", default="fastspec_eval", help="folder for results.json, report.md and plots")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--replay", action="store_true",
                        help="offline α: decode autoregressively once, then run only the drafters along those outputs "
                        "(greedy; α, τ and per-position acceptance equal the engine's; no speed columns)")
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
    """:func:`compare` + ROUGE of every decoder's outputs against the references."""
    result = compare(target, decoders, prompts, max_new_tokens=max_new_tokens, gamma=gamma,
                     generate_kwargs=generate_kwargs, progress=progress, desc="eval")
    if references is not None and tokenizer is not None:
        for row in result.rows:
            row.update(rouge_scores(decode_texts(tokenizer, result.runs[row["name"]].outputs), references))
    return {"rows": result.rows, "runs": result.runs, "greedy": result.greedy, "mismatches": result.mismatches()}


EVAL_EXTRA_COLUMNS = ("kind", "training")


def write_eval_report(result: Dict[str, Any], out_dir: str, settings: Dict[str, Any]) -> Dict[str, str]:
    """results.json, report.md, per_position_acceptance.png and alpha.png in ``out_dir``."""
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
    if result.get("greedy", True) and rows and rows[0].get("token_agreement") is not None:
        sections.append(("Agreement with autoregressive decoding", agreement_table(rows)))
    if rows and "rouge1" in rows[0]:
        sections.append(("ROUGE (F1)", report.markdown_table(rows, rouge_columns)))
    sections.append(("Plots", "![per-position acceptance](per_position_acceptance.png)\n\n![alpha](alpha.png)"))
    files["markdown"] = report.write_markdown(os.path.join(out_dir, "report.md"), "fastspec eval", sections)
    return files


def main(args) -> int:
    """Run ``fastspec eval``; returns the exit status (1 when greedy outputs differ from AR)."""
    check_flags(args)
    checkpoints = parse_checkpoints(args.ckpt_path)
    if not checkpoints and not args.builtin:
        raise UserError("nothing to evaluate: give --ckpt_path FOLDER [FOLDER ...] and/or --builtin prompt_lookup")
    work = load_workload(args.target, args.device, args.dataset, args.split, args.num_samples, args.max_source_length,
                         dtype=args.dtype)
    decoders = checkpoint_decoders(work.target, checkpoints, args.builtin, args.gamma, args.drafter_dtype)
    if args.replay:
        return replay_main(work, decoders, args)
    result = evaluate(work.target, work.tokenizer, decoders, work.prompts, work.references,
                      max_new_tokens=args.max_new_tokens, gamma=args.gamma, generate_kwargs=generation_kwargs(args),
                      progress=not args.no_progress)
    settings = {
        "target": args.target, "dataset": args.dataset, "split": args.split, "num_prompts": len(work.prompts),
        "max_new_tokens": args.max_new_tokens, "gamma": args.gamma, "device": args.device,
        "decoding": "sampling" if args.do_sample else "greedy", "torch_threads": torch.get_num_threads(),
        "dtype": str(introspect.model_dtype(work.target)).replace("torch.", ""),
        "drafter_dtype": args.drafter_dtype or "the target's",
        "checkpoints": {label: path for label, path in checkpoints},
    }
    files = write_eval_report(result, args.out, settings)
    columns = list(report.SPEC_COLUMNS)
    columns[1:1] = [report.Column("training", "training", lambda v: v or "–")]
    print(report.text_table(result["rows"], columns))
    if result["greedy"]:
        print("\n" + agreement_table(result["rows"], markdown=False))
    print(f"\nreport: {files['markdown']}\njson:   {files['json']}")
    return report_mismatches(result["mismatches"])


def replay_evaluate(target, decoders: Sequence[Decoder], prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    gamma: int, generate_kwargs: Optional[Dict[str, Any]] = None, progress: bool = True) -> list:
    """Rows of α, τ, per-position acceptance and c for every drafter, by offline replay (DESIGN §8):
    the target decodes each prompt once, autoregressively; each drafter then runs alone along those
    outputs (:func:`fastspec.distill.replay.replay_runs`). c uses the autoregressive forward's time."""
    kwargs = dict(generate_kwargs or {})
    if kwargs.get("do_sample"):
        raise UserError("--replay needs greedy decoding: only the greedy trajectory is fixed by the target's output")
    ar = decode_all(target, [Decoder(AR_NAME)], prompts, max_new_tokens=max_new_tokens, gamma=gamma,
                    generate_kwargs=kwargs, progress=progress, desc="autoregressive")[AR_NAME]
    rows = []
    for d in decoders:
        if d.drafter is None:
            continue
        start = time.perf_counter()
        metrics = replay_runs(target, {d.name: d.drafter}, prompts, ar.outputs, gamma=d.gamma or gamma,
                              max_new_tokens=max_new_tokens, **{**kwargs, **d.options})[d.name]
        # the replay runs no target forward: c is against the autoregressive decode step
        metrics.verify_calls, metrics.verify_time_s = ar.metrics.verify_calls, ar.metrics.verify_time_s
        run = DecodeRun(d.name, d.gamma or gamma, outputs=list(ar.outputs), time_s=time.perf_counter() - start,
                        metrics=metrics, info=dict(d.info))
        rows.append(dict(summarize(run, None, greedy=True), replay_s=run.time_s, engine_ar_s=ar.time_s))
    return rows


def replay_main(work: Workload, decoders: Sequence[Decoder], args) -> int:
    rows = replay_evaluate(work.target, decoders, work.prompts, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                           generate_kwargs=generation_kwargs(args), progress=not args.no_progress)
    columns = [c for c in report.SPEC_COLUMNS if c.key in ("name", "gamma", "acceptance_rate", "mean_accepted_length",
                                                           "ideal_speedup")]
    columns.append(report.Column("c", "c", report.fmt_float(4)))
    os.makedirs(args.out, exist_ok=True)
    report.write_json({"mode": "replay", "rows": rows}, os.path.join(args.out, "results.json"))
    report.write_markdown(os.path.join(args.out, "report.md"), "fastspec eval --replay",
                          [("Offline replay (greedy)", report.markdown_table(rows, columns))])
    print(report.text_table(rows, columns))
    print(f"\nreport: {os.path.join(args.out, 'report.md')}")
    return 0


def report_mismatches(bad: Sequence[str]) -> int:
    """Print the decoders whose greedy outputs betray a bug; the exit status (1 if any)."""
    if bad:
        print(f"ERROR: greedy outputs differ from autoregressive decoding (not at a near-tie) for: {', '.join(bad)}")
        return 1
    return 0
