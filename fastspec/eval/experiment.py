"""``fastspec experiment distill``: does distilling a drafter from the target raise α?

The grid: drafters (n-gram, CNN, LSTM, layer-skip with exit head, feature) × training methods
(``baseline`` = cross-entropy on the references; ``seq_kd`` = on the target's own outputs;
fkl/rkl/jsd/tvd at T ∈ {1, 2} against the target's cached top-k distribution on its outputs;
``on_policy`` = the baseline cell's drafter, then ``on_policy_steps`` of KD on its own samples
scored by the target, as DistillSpec distils an already trained drafter). Every other cell of a
drafter gets the same compute budget (optimizer steps × batch) and the same data:

* train: the first ``num_train`` examples of the train split, with the target's greedy outputs
  (a pseudo-dataset with top-k logits, made once in ``DIR/data/pseudo``);
* test: ``num_test`` test prompts and the target's greedy outputs on them (batch 1, made once).

α and τ of every cell come from offline replay (:mod:`fastspec.distill.replay`): exact under
greedy decoding, without running the target per step. Per prompt Σβ and row-steps give 95%
bootstrap intervals over prompts for α and, paired, for α(cell) / α(baseline). The real engine
runs only for the speed columns: the best cell of each drafter against autoregressive decoding
on ``speed_prompts`` prompts (c, measured and ideal speedup, and identity with the target's own
output).

Each cell writes ``DIR/cells/<drafter>-<method>/result.json`` when it ends, finished or failed
(a one-line error: a NaN loss, a corrupt cache file ...); the rest of the grid still runs, and a
rerun of the same command skips the finished cells and retries the failed ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from fastspec import engine, introspect
from fastspec.data import encode_prompts, encode_references, load_examples
from fastspec.distill.feature import FeatureTrainConfig, train_feature_drafter
from fastspec.distill.feature_data import extract_features
from fastspec.distill.losses import DIVERGENCES
from fastspec.distill.pseudo import PseudoSettings, SourceRecord, generate_pseudo_dataset, load_pseudo_dataset
from fastspec.distill.replay import replay_prompts
from fastspec.distill.train_cli import feature_pairs
from fastspec.distill.trainer import TrainConfig, train_drafter
from fastspec.drafters.io import load_drafter
from fastspec.errors import UserError
from fastspec.eval import AR_NAME, Decoder, compare, decode_all
from fastspec.eval.experiment_report import write_grid_report
from fastspec.files import atomic_write_text
from fastspec.flags import add_target_flags
from fastspec.metrics import GenerationMetrics
from fastspec.targets import load_target_and_tokenizer

DRAFTERS = ("ngram", "cnn", "lstm", "layer_skip", "feature")
TEMPERATURES = (1, 2)
METHODS = ("baseline", "seq_kd") + tuple(f"{d}_T{t}" for d in DIVERGENCES for t in TEMPERATURES) + ("on_policy",)
GREEDY = {"do_sample": False}


def applies(drafter: str, method: str) -> bool:
    """n-gram counts have no distribution to match (baseline and seq_kd only); the feature drafter
    has no on-policy trainer."""
    if drafter == "ngram":
        return method in ("baseline", "seq_kd")
    return not (drafter == "feature" and method == "on_policy")


@dataclass
class GridSettings:
    target: str = "smollm2"
    dataset: str = "aclsum"
    num_train: int = 100
    num_test: int = 100
    max_source_length: int = 512
    max_target_length: int = 128
    max_new_tokens: int = 64
    gamma: int = 4
    topk_logits: int = 64
    pseudo_batch_size: int = 8
    batch_size: int = 8
    neural_steps: int = 300  # CNN and LSTM
    neural_lr: float = 5e-3
    # the exit head is shortlisted (8192 rows, as for CNN/LSTM): a step costs ~1/6 of a full 49152 head's,
    # and from the target head's rows it needs a higher rate (KD loss 1.1 after 100 steps at 1e-2, 8.2 at 1e-3)
    layer_skip_steps: int = 100
    layer_skip_lr: float = 1e-2
    layer_skip_layers: int = 2
    feature_steps: int = 200
    feature_lr: float = 5e-4
    ngram_n: int = 3
    on_policy_max_new_tokens: int = 32
    # an on-policy step runs the target over prompt + samples (the others read cached logits): ~50×
    # the compute of an offline step on SmolLM2, so its cells get fewer steps
    on_policy_steps: int = 10
    speed_prompts: int = 8
    resamples: int = 2000
    seed: int = 0
    # cells run in this many processes at once, each with its share of torch's threads (small
    # drafters use one core poorly); 0 = one per CPU core up to 4 (1 on CUDA)
    workers: int = 0
    drafters: Sequence[str] = DRAFTERS
    methods: Sequence[str] = METHODS

    # settings a cell's result does not depend on: a rerun may change them
    FREE = ("drafters", "methods", "speed_prompts", "resamples", "workers")

    def check(self) -> None:
        bad = [d for d in self.drafters if d not in DRAFTERS] + [m for m in self.methods if m not in METHODS]
        if bad:
            raise UserError(f"unknown drafter or method {bad[0]!r}; drafters: {', '.join(DRAFTERS)}; "
                            f"methods: {', '.join(METHODS)}")
        sizes = ("num_train", "num_test", "max_new_tokens", "gamma", "batch_size", "neural_steps", "layer_skip_steps",
                 "feature_steps", "resamples", "layer_skip_layers", "on_policy_steps")
        small = [name for name in sizes if getattr(self, name) < 1]
        if small:
            raise UserError(f"--{small[0]} must be >= 1")
        if self.workers < 0:
            raise UserError("--workers must be >= 0 (0 = one per CPU core, up to 4)")
        if "baseline" not in self.methods:
            raise UserError("the grid needs the baseline method (every ratio is against it)")

    def key(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.FREE}


QUICK = dict(num_train=12, num_test=6, max_new_tokens=24, neural_steps=8, layer_skip_steps=3, feature_steps=6,
             layer_skip_layers=1,
             on_policy_max_new_tokens=8, on_policy_steps=2, speed_prompts=2, resamples=300, topk_logits=16)


@dataclass
class GridData:
    records: List[dict]  # pseudo-dataset records: source_ids, reference_ids, output_ids, logits_file
    pseudo_dir: str
    test_prompts: List[List[int]]
    test_outputs: List[List[int]]  # the target's greedy new tokens per test prompt (batch 1)
    stats: Dict[str, float] = field(default_factory=dict)
    features: Dict[str, Any] = field(default_factory=dict)  # extracted feature data per text kind
    test_features: Dict[Any, Any] = field(default_factory=dict)  # the target's features on the test outputs


# --------------------------------------------------------------------------- data


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def prepare_data(target, train: Sequence[SourceRecord], test_prompts: Sequence[Sequence[int]], s: GridSettings,
                 data_dir: str, progress: bool = True) -> GridData:
    """The pseudo-dataset (resumable) and the target's greedy test outputs (cached), made once."""
    model = introspect.hf_model(target)
    pseudo_dir = os.path.join(data_dir, "pseudo")
    started = time.perf_counter()
    generate_pseudo_dataset(model, train, pseudo_dir, PseudoSettings(
        batch_size=s.pseudo_batch_size, max_new_tokens=s.max_new_tokens, topk_logits=s.topk_logits),
        target_name=s.target, progress=progress)
    pseudo_s = time.perf_counter() - started
    records = load_pseudo_dataset(pseudo_dir)
    outputs_file = os.path.join(data_dir, "test_outputs.json")
    key = _fingerprint(s.target, s.max_new_tokens, [list(p) for p in test_prompts])
    cached = None
    if os.path.exists(outputs_file):
        try:
            with open(outputs_file, encoding="utf-8") as handle:
                cached = json.load(handle)
        except (OSError, json.JSONDecodeError):
            cached = None  # a damaged cache is remade
    if cached and cached.get("key") == key:
        outputs, ar_s = cached["outputs"], cached.get("seconds")
    else:
        started = time.perf_counter()
        runs = decode_all(model, [Decoder(AR_NAME)], test_prompts, max_new_tokens=s.max_new_tokens,
                          generate_kwargs=GREEDY, progress=progress, desc="target outputs")
        outputs, ar_s = runs[AR_NAME].outputs, time.perf_counter() - started
        atomic_write_text(outputs_file, json.dumps({"key": key, "outputs": outputs, "seconds": ar_s}))
    pseudo_tokens = sum(len(r["output_ids"]) for r in records)
    stats = {"pseudo_tokens": pseudo_tokens, "test_tokens": sum(len(o) for o in outputs), "ar_s": ar_s}
    if pseudo_s > 1.0:  # freshly generated (a resumed run only reads it back)
        stats["pseudo_tokens_per_s"] = pseudo_tokens / pseudo_s
    return GridData(records, pseudo_dir, [list(p) for p in test_prompts], [list(o) for o in outputs], stats)


def encode_split(tokenizer, model, s: GridSettings, split: str, limit: int):
    """(examples, encoded prompts, encoded references) of ``limit`` examples of ``split``."""
    examples = load_examples(s.dataset, split=split, limit=limit)
    prompts = encode_prompts(tokenizer, model, [e.source for e in examples], s.max_source_length)
    refs = encode_references(tokenizer, [e.reference for e in examples], max_target_length=s.max_target_length)
    return examples, prompts, refs


# --------------------------------------------------------------------------- one cell


def method_losses(method: str) -> Dict[str, Any]:
    """TrainConfig fields of a method: CE on references, or a KD term (loss 0, kd_loss 1)."""
    if method == "baseline":
        return dict(loss=1.0, kd_loss=0.0)
    if method == "seq_kd":
        return dict(loss=0.0, kd_loss=1.0, distill_method="seq_kd")
    if method == "on_policy":
        return dict(loss=0.0, kd_loss=1.0, distill_method="on_policy", on_policy_divergence="fkl")
    name, temp = method.rsplit("_T", 1)
    return dict(loss=0.0, kd_loss=1.0, distill_method=name, kd_temp=float(temp), teacher_logits="cache")


def _feature_data(target, data: GridData, text: str, s: GridSettings, data_dir: str, progress: bool):
    """Teacher features over the references or the target's outputs, extracted once per grid."""
    if text not in data.features:
        pairs = feature_pairs(target, data.records, text, max_new_tokens=s.max_new_tokens)
        data.features[text] = extract_features(target, pairs, cache_dir=os.path.join(data_dir, f"features_{text}"),
                                               max_length=s.max_source_length + s.max_target_length,
                                               progress=progress)
    return data.features[text]


def _feature_text(method: str) -> str:
    """The text a feature cell is teacher-forced on: the references (baseline) or the target's outputs."""
    return "references" if method == "baseline" else "pseudo"


def train_feature_cell(target, data: GridData, method: str, s: GridSettings, data_dir: str, progress: bool):
    """baseline: the references as text; seq_kd: the target's outputs, EAGLE's loss (smooth L1 on
    features + 0.1 fkl); a divergence cell: the target's outputs, that divergence at weight 1."""
    text = _feature_text(method)
    if method in ("baseline", "seq_kd"):
        divergence, temperature, weight = "fkl", 1.0, 0.1
    else:
        name, temp = method.rsplit("_T", 1)
        divergence, temperature, weight = name, float(temp), 1.0
    config = FeatureTrainConfig(divergence=divergence, temperature=temperature, divergence_weight=weight,
                                max_steps=s.feature_steps, lr=s.feature_lr, batch_size=s.batch_size, seed=s.seed,
                                progress=progress)
    features = _feature_data(target, data, text, s, data_dir, progress)
    drafter = train_feature_drafter(target, config=config, data=features)
    return drafter, {"steps": drafter.train_stats["steps"], "final_loss": drafter.train_stats["final_loss"]}


def cell_folder(out_dir: str, drafter: str, method: str) -> str:
    """The folder of one cell: its result.json, logs and ``drafter/``."""
    return os.path.join(out_dir, "cells", f"{drafter}-{method}")


def train_cell(target, data: GridData, drafter: str, method: str, s: GridSettings, out_dir: str, progress: bool):
    """Train one cell; its drafter is saved in ``cell_folder(...)/drafter``. Returns (drafter, training info)."""
    cell_dir, data_dir = cell_folder(out_dir, drafter, method), os.path.join(out_dir, "data")
    folder = os.path.join(cell_dir, "drafter")
    if drafter == "feature":
        trained, info = train_feature_cell(target, data, method, s, data_dir, progress)
        trained.save(folder)
        return trained, info
    steps, lr = {"layer_skip": (s.layer_skip_steps, s.layer_skip_lr)}.get(drafter, (s.neural_steps, s.neural_lr))
    options = {"num_layers": s.layer_skip_layers} if drafter == "layer_skip" else {}
    init_from = None
    if method == "on_policy":  # DistillSpec's set-up: on-policy KD of an already trained drafter (the baseline)
        steps, options = min(steps, s.on_policy_steps), {}
        init_from = os.path.join(cell_folder(out_dir, drafter, "baseline"), "drafter")
        if (read_cell(out_dir, drafter, "baseline") or {}).get("status") != "ok":
            raise UserError(f"on_policy continues the {drafter}-baseline cell, which has not finished; rerun the grid")
    config = TrainConfig(out_dir=cell_dir, drafter=drafter, max_steps=steps, batch_size=s.batch_size, lr=lr,
                         warmup_steps=min(10, steps // 10), seed=s.seed, ckpt_every=0, progress=progress,
                         on_policy_max_new_tokens=s.on_policy_max_new_tokens, **method_losses(method))
    trained = train_drafter(target, data.records, config, progress=progress, drafter_options=options,
                            pseudo_dir=data.pseudo_dir, ngram_n=s.ngram_n, init_from=init_from)
    shutil.rmtree(os.path.join(cell_dir, "checkpoints"), ignore_errors=True)  # the final drafter is kept
    info = {"steps": 0 if drafter == "ngram" else steps}
    losses = _logged_losses(cell_dir)
    if losses:
        info["final_loss"] = losses[-1]
    return trained, info


def _logged_losses(cell_dir: str) -> List[float]:
    path = os.path.join(cell_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["loss"] for line in handle if line.strip()]


def check_finite(folder: str, losses: Sequence[float] = ()) -> None:
    """A NaN loss or NaN weights end the cell (the drafter would draft garbage, silently)."""
    from safetensors import safe_open

    if not all(math.isfinite(loss) for loss in losses):
        raise UserError("the training loss became NaN/inf")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise UserError(f"the trained weights hold NaN/inf ({name}: {key})")


def score(target, drafter, data: GridData, s: GridSettings) -> Dict[str, Any]:
    """α and τ by replay on the test prompts, with the per-prompt sums the bootstrap needs."""
    started = time.perf_counter()
    per_prompt: List[GenerationMetrics] = replay_prompts(
        target, {"cell": drafter}, data.test_prompts, data.test_outputs, gamma=s.gamma,
        max_new_tokens=s.max_new_tokens, feature_cache=data.test_features, **GREEDY)["cell"]
    merged = sum(per_prompt, GenerationMetrics())
    return {"alpha": merged.acceptance_rate, "tau": merged.mean_accepted_length,
            "per_position_acceptance": merged.per_position_acceptance, "replay_s": time.perf_counter() - started,
            "beta_sums": [m.beta_sum for m in per_prompt], "row_steps": [m.row_steps for m in per_prompt],
            "accepted": merged.num_accepted_tokens, "drafted": merged.num_draft_tokens}


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def run_cell(target, data: GridData, drafter: str, method: str, s: GridSettings, out_dir: str, progress: bool):
    """Train + score one cell and write its result.json (status ok, or failed with the error)."""
    cell_dir = cell_folder(out_dir, drafter, method)
    os.makedirs(cell_dir, exist_ok=True)
    for stale in ("log.jsonl", "log.csv"):  # a retried cell logs afresh
        if os.path.exists(os.path.join(cell_dir, stale)):
            os.remove(os.path.join(cell_dir, stale))
    result: Dict[str, Any] = {"drafter": drafter, "method": method}
    started = time.perf_counter()
    try:
        trained, info = train_cell(target, data, drafter, method, s, out_dir, progress)
        result.update(info, train_s=time.perf_counter() - started)
        check_finite(os.path.join(cell_dir, "drafter"), [info.get("final_loss", 0.0)])
        result.update(score(target, trained, data, s), status="ok")
    except Exception as err:  # a failed cell is reported; the grid goes on (KeyboardInterrupt stops it)
        result.update(status="failed", error=one_line(err))
        print(f"fastspec experiment: cell {drafter}-{method} failed: {result['error']}", file=sys.stderr)
    atomic_write_text(os.path.join(cell_dir, "result.json"), json.dumps(result))
    return result


def read_cell(out_dir: str, drafter: str, method: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(cell_folder(out_dir, drafter, method), "result.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None  # a damaged result is rerun


# --------------------------------------------------------------------------- the grid


def check_settings(out_dir: str, s: GridSettings) -> None:
    """A folder holds one grid: its cells are only comparable under the same settings."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            old = json.load(handle)
        changed = sorted(k for k, v in s.key().items() if json.loads(json.dumps(v)) != old.get(k))
        if changed:
            raise UserError(f"{out_dir} holds a grid made with other settings ({', '.join(changed)}); "
                            "use another --out or the same settings")
    else:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(path, json.dumps(s.key(), indent=2))


def speed_check(target, out_dir: str, cells: Sequence[Dict[str, Any]], data: GridData, s: GridSettings,
                progress: bool) -> Dict[str, Dict[str, Any]]:
    """The real engine: the best cell of each drafter vs autoregressive decoding (interleaved)."""
    best: Dict[str, Dict[str, Any]] = {}
    for cell in cells:
        if cell.get("status") == "ok" and cell["alpha"] >= best.get(cell["drafter"], {}).get("alpha", -1.0):
            best[cell["drafter"]] = cell
    if not best or s.speed_prompts < 1:
        return {}
    model = introspect.hf_model(target)
    decoders = [Decoder(f"{c['drafter']}-{c['method']}", load_drafter(
        os.path.join(cell_folder(out_dir, c["drafter"], c["method"]), "drafter"), model), s.gamma)
        for c in best.values()]
    prompts = data.test_prompts[: s.speed_prompts]
    result = compare(model, decoders, prompts, max_new_tokens=s.max_new_tokens, gamma=s.gamma,
                     generate_kwargs=GREEDY, progress=progress, desc="speed")
    ar_outputs = result.runs[AR_NAME].outputs
    rows = {}
    for drafter, cell in best.items():
        row = next(r for r in result.rows if r["name"] == f"{drafter}-{cell['method']}")
        rows[drafter] = {"cell": row["name"], "c": row["c"], "speedup": row["speedup"],
                         "engine_alpha": row["acceptance_rate"], "identical": row["identical"],
                         "ar_matches_cache": ar_outputs == data.test_outputs[: len(prompts)]}
    return rows


def _grid_cells(s: GridSettings) -> List[tuple]:
    return [(d, m) for d in s.drafters for m in s.methods if applies(d, m)]


_WORKER: Dict[str, Any] = {}


def _portable(model) -> tuple:
    """What a spawned process needs to rebuild ``model``: HF models hold hooks that do not pickle,
    their weights do (through shared memory)."""
    return type(model), model.config, model.generation_config, model.state_dict()


def _rebuild(parts: tuple):
    cls, config, generation_config, state = parts
    model = cls(config)
    model.load_state_dict(state)
    model.generation_config = generation_config
    return model.to(next(iter(state.values())).device).eval()


def _start_worker(target_parts: tuple, data: GridData, s: GridSettings, out_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(target=_rebuild(target_parts), data=data, s=s, out_dir=out_dir)


def _run_in_worker(cell: tuple) -> Dict[str, Any]:
    w = _WORKER
    return run_cell(w["target"], w["data"], cell[0], cell[1], w["s"], w["out_dir"], progress=False)


def run_cells(target, data: GridData, s: GridSettings, out_dir: str, cells: Sequence[tuple], progress: bool):
    """Yield the result of each (drafter, method) cell as it ends: in this process, or in
    ``s.workers`` spawned processes that each get the target and the data once."""
    workers = s.workers or (1 if introspect.model_device(target).type == "cuda" else min(4, os.cpu_count() or 1))
    if workers <= 1 or len(cells) <= 1:
        for drafter, method in cells:
            print(f"fastspec experiment: cell {drafter}-{method}", file=sys.stderr)
            yield run_cell(target, data, drafter, method, s, out_dir, progress)
        return
    data_dir = os.path.join(out_dir, "data")
    for text in sorted({_feature_text(m) for d, m in cells if d == "feature"}):
        _feature_data(target, data, text, s, data_dir, progress)  # extracted once, read back by the workers
    shared = replace(data, features={}, test_features={})
    threads = max(1, torch.get_num_threads() // workers)
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(_portable(introspect.hf_model(target)), shared, s, out_dir, threads)) as pool:
        for result in pool.map(_run_in_worker, cells):
            print(f"fastspec experiment: cell {result['drafter']}-{result['method']} {result['status']}",
                  file=sys.stderr)
            yield result


def run_grid(target, data: GridData, s: GridSettings, out_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Every cell (finished ones are read back), then the speed check and the report."""
    done = {cell: read_cell(out_dir, *cell) for cell in _grid_cells(s)}
    pending = [cell for cell, result in done.items() if result is None or result.get("status") != "ok"]
    for result in run_cells(target, data, s, out_dir, pending, progress):
        done[(result["drafter"], result["method"])] = result
    cells = list(done.values())
    speed = speed_check(target, out_dir, cells, data, s, progress)
    return write_grid_report(out_dir, cells, speed, data.stats, s.key(), s.gamma, s.resamples, s.seed)


# --------------------------------------------------------------------------- command line


# settings with a flag of their own (shared target flags, lists); every other field gets --<name>
OWN_FLAGS = ("target", "drafters", "methods", "max_source_length", "dataset")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``fastspec experiment distill`` flags (sizes default to the full grid; --quick shrinks them)."""
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = sub.add_parser("distill", help="baseline vs distilled α for every drafter, with bootstrap CIs",
                       description=__doc__.split("\n\n")[0])
    add_target_flags(p, max_source_length=GridSettings.max_source_length)
    p.add_argument("--out", required=True, help="folder for results.json, results.md, alpha.png and the cells "
                   "(rerunning the same command resumes)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (about 10 min on 2 cores): checks the pipeline, "
                   "not the question")
    p.add_argument("--drafters", nargs="+", default=list(DRAFTERS), choices=DRAFTERS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    for f in fields(GridSettings):
        if f.name in OWN_FLAGS:
            continue
        p.add_argument(f"--{f.name}", type=type(f.default), default=None,
                       help=f"default {f.default} ({QUICK[f.name]} with --quick)" if f.name in QUICK else
                       f"default {f.default}")
    p.add_argument("--dataset", default="aclsum", help="train/test examples (aclsum, or a dataset spec of fastspec.data)")
    p.add_argument("--no_progress", action="store_true")
    return parser


def settings_from_args(args) -> GridSettings:
    s = GridSettings(target=args.target or "smollm2", dataset=args.dataset, drafters=tuple(args.drafters),
                     methods=tuple(args.methods), max_source_length=args.max_source_length or 512)
    if args.quick:
        s = replace(s, **QUICK)
    given = {f.name: getattr(args, f.name) for f in fields(GridSettings) if getattr(args, f.name, None) is not None
             and f.name not in OWN_FLAGS}
    s = replace(s, **given)
    s.check()
    return s


def main(args) -> int:
    s = settings_from_args(args)
    progress = not args.no_progress
    check_settings(args.out, s)
    target, tokenizer = load_target_and_tokenizer(s.target, args.device, dtype=getattr(args, "dtype", None))
    model = introspect.hf_model(target)
    if introspect.model_dtype(model) not in (torch.float32, torch.float64):
        raise UserError("the grid measures α by exact replay: run the target in fp32 (--dtype float32)")
    examples, prompts, refs = encode_split(tokenizer, model, s, "train", s.num_train)
    train = [SourceRecord(i, e.id, p, r) for i, (e, p, r) in enumerate(zip(examples, prompts, refs))]
    _, test_prompts, _ = encode_split(tokenizer, model, s, "test", s.num_test)
    data = prepare_data(model, train, test_prompts, s, os.path.join(args.out, "data"), progress)
    summary = run_grid(model, data, s, args.out, progress)
    print(summary["markdown"])
    failed = [c for c in summary["cells"] if c.get("status") != "ok"]
    print(f"results in {args.out}/results.json, results.md and alpha.png"
          + (f"; {len(failed)} cell(s) failed (rerun the same command to retry them)" if failed else ""))
    return 1 if failed else 0


__all__ = ["GridSettings", "GridData", "METHODS", "DRAFTERS", "QUICK", "applies", "prepare_data", "run_grid",
           "run_cell", "run_cells", "score", "method_losses", "speed_check", "add_arguments", "main"]
