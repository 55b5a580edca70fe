"""The drafter training loop: baseline (cross-entropy on references) and distillation.

    total = loss · CE(student, references) + kd_loss · KD

``distill_method`` picks KD:
* ``seq_kd``    CE on the target's pseudo outputs (sequence-level KD);
* ``fkl``       forward KL at temperature T (the seed's loss), ``rkl``, ``jsd``, ``tvd``:
  token-level divergences on teacher-forced target logits over the pseudo outputs when
  the data has them, else over the references; the target logits come from a no-grad
  target forward ("online") or from the pseudo-dataset's top-k cache ("cache");
* ``on_policy`` the student samples outputs, the target scores them, and
  ``on_policy_divergence`` (default fkl) is taken on those samples (DistillSpec).

Determinism (what makes ``--resume`` exact): the data order of epoch e is
``randperm(N, seed + e)``, step s reads items [s·B, (s+1)·B) of the concatenated epochs,
and the global RNG is re-seeded with ``seed + step`` before each step (dropout, on-policy
sampling). The checkpoint then only needs the weights, the optimizer and scheduler
states and the step.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastspec import engine, introspect
from fastspec.distill.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fastspec.distill.distributed import DistInfo
from fastspec.distill.losses import DIVERGENCES, divergence, masked_cross_entropy, sparse_teacher_divergence
from fastspec.distill.pseudo import load_topk_cache, load_topk_logits
from fastspec.distill.students import (
    DEFAULT_SHORTLIST, NEURAL_CLASSES, SHORTLISTED_KINDS, NeuralStudent, TrainingError, build_student, label_shortlist,
)
from fastspec.distill.teacher import pad_left, pad_right, teacher_forced_logits
from fastspec.drafters import NgramDrafter
from fastspec.drafters.folder import update_config

DISTILL_METHODS = ("seq_kd",) + DIVERGENCES + ("on_policy",)
LOG_FIELDS = ("step", "loss", "ce", "kd", "lr", "grad_norm", "tokens", "time_s", "eval_alpha")


@dataclass
class TrainConfig:
    out_dir: Optional[str] = None  # checkpoints, logs and the final drafter; None = in memory only
    drafter: str = "lstm"  # the CLI's --drafter (recorded in the drafter's config)
    max_steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adafactor
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr · min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    loss: float = 1.0  # weight of CE on references
    kd_loss: float = 0.0  # weight of the KD term
    kd_temp: float = 1.0
    distill_method: str = "fkl"
    on_policy_divergence: str = "fkl"
    on_policy_max_new_tokens: int = 32
    teacher_logits: str = "online"  # online | cache
    seed: int = 0
    ckpt_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = only at the end (when an eval_fn is given)
    amp: Optional[str] = None  # None = bf16 on CUDA, off on CPU; "off" | "bf16" | "fp16"
    progress: bool = True

    def validate(self) -> None:
        if self.distill_method not in DISTILL_METHODS:
            raise TrainingError(f"--distill_method must be one of {DISTILL_METHODS}, not {self.distill_method!r}")
        if self.on_policy_divergence not in DIVERGENCES:
            raise TrainingError(f"--on_policy_divergence must be one of {DIVERGENCES}")
        if self.optimizer not in ("adamw", "adafactor"):
            raise TrainingError(f"--optimizer must be adamw or adafactor, not {self.optimizer!r}")
        if self.teacher_logits not in ("online", "cache"):
            raise TrainingError("--teacher_logits must be online or cache")
        if self.loss < 0 or self.kd_loss < 0 or self.loss + self.kd_loss == 0:
            raise TrainingError("--loss and --kd_loss must be >= 0 and not both 0")
        if self.kd_temp <= 0:
            raise TrainingError(f"--kd_temp must be > 0, got {self.kd_temp}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise TrainingError("--max_steps and --batch_size must be >= 1")

    # settings that must not change between a run and its --resume
    def resume_key(self) -> dict:
        skip = {"out_dir", "progress", "ckpt_every", "keep_checkpoints", "eval_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class TrainItem:
    """One training row. ``output_ids`` are the target's pseudo outputs (if any)."""

    index: int
    source_ids: List[int]
    reference_ids: Optional[List[int]] = None
    output_ids: Optional[List[int]] = None
    record: Optional[dict] = None  # the pseudo-dataset record (logits cache lookup)


@dataclass
class TrainResult:
    step: int
    final_loss: float
    log_path: str
    history: List[dict] = field(default_factory=list)


def _batch_indices(step: int, batch_size: int, n: int, seed: int, cache: Dict[int, List[int]]) -> List[int]:
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch = k // n
        if epoch not in cache:
            cache.clear()  # at most two epochs are ever live
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(cache[epoch][k % n])
    return out


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(params, config: TrainConfig):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError("the drafter has no trainable parameters")
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.lr, weight_decay=config.weight_decay, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Trains ``student`` (see :mod:`fastspec.distill.students`) against ``teacher``.

    teacher: the target (fastspec target or HF model); not needed for pure CE/seq_kd.
    eval_fn(step) -> dict with at least ``alpha``: run on rank 0 every ``eval_every``.
    save_fn(folder): writes the drafter folder at the end (rank 0).
    """

    def __init__(
        self,
        student,
        items: Sequence[TrainItem],
        config: TrainConfig,
        *,
        teacher=None,
        dist_info: Optional[DistInfo] = None,
        eval_fn: Optional[Callable[[int], dict]] = None,
        save_fn: Optional[Callable[[str], None]] = None,
        pseudo_dir: Optional[str] = None,
        on_step_end: Optional[Callable[[int], None]] = None,
    ):
        config.validate()
        if not items:
            raise TrainingError("no training data")
        self.student, self.items, self.config = student, list(items), config
        self.teacher = introspect.hf_model(teacher) if teacher is not None else None
        self.info = dist_info or DistInfo(0, 1, 0, torch.device("cpu"))
        self.eval_fn, self.save_fn, self.pseudo_dir, self.on_step_end = eval_fn, save_fn, pseudo_dir, on_step_end
        self._check_setup()
        self.device = self.info.device
        self.student.module.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.module = self.student.module
        if self.info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            if config.drafter == "layer_skip":
                raise TrainingError("--drafter layer_skip is not supported under torchrun (its forward is the target's)")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.student.module, device_ids=ids)
        self.optimizer = make_optimizer(self.student.module.parameters(), config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        )
        self.step = 0
        root = config.out_dir
        self.ckpt_root = os.path.join(root, "checkpoints") if root else None
        self.log_jsonl = os.path.join(root, "log.jsonl") if root else None
        self.log_csv = os.path.join(root, "log.csv") if root else None
        self._perm_cache: Dict[int, List[int]] = {}
        # fp16 autocast needs loss scaling (bf16 does not); its state is checkpointed
        fp16 = (config.amp == "fp16") and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    # ------------------------------------------------------------------ set-up checks
    def _check_setup(self) -> None:
        c = self.config
        needs_teacher = c.kd_loss > 0 and c.distill_method in DIVERGENCES + ("on_policy",) and not (
            c.teacher_logits == "cache" and c.distill_method != "on_policy"
        )
        if needs_teacher and self.teacher is None:
            raise TrainingError(f"--distill_method {c.distill_method} needs the target for online logits")
        if self.teacher is not None:
            tv = introspect.vocab_size(self.teacher)
            if tv != self.student.vocab_size:
                raise TrainingError(f"wrong vocab: the drafter has {self.student.vocab_size} logits, the target {tv}")
        if c.loss > 0 and not any(it.reference_ids for it in self.items):
            raise TrainingError("--loss > 0 needs references, but the data has none (unlabeled or pseudo without references)")
        if c.kd_loss > 0 and c.distill_method == "seq_kd" and not any(it.output_ids for it in self.items):
            raise TrainingError("--distill_method seq_kd needs a pseudo-dataset (--pseudo_dataset_path)")
        if c.kd_loss > 0 and c.teacher_logits == "cache" and c.distill_method in DIVERGENCES:
            if self.pseudo_dir is None or not all(it.record and "logits_file" in it.record for it in self.items):
                raise TrainingError("--teacher_logits cache needs a pseudo-dataset made with --topk_logits")

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        mode = self.config.amp or ("bf16" if self.device.type == "cuda" else "off")
        if mode == "off":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)

    def _teacher_logits(self, sources, outputs, rows: List[TrainItem]):
        """Teacher logits [B,T,V], or [B,T,N] on a shortlisted student's head (positions whose
        teacher argmax is outside the shortlist are masked), and the mask [B,T]."""
        c, vocab = self.config, self.student.vocab_size
        short = getattr(self.student, "shortlist", None)
        if c.teacher_logits == "cache" and c.distill_method != "on_policy" and short is not None:
            # sparse: (log-probs [B,T,k], head columns [B,T,k], tail [B,T]); the divergence never
            # builds the dense [B,T,N] teacher (sparse_teacher_divergence)
            parts = [short.teacher_topk_sparse(*load_topk_cache(self.pseudo_dir, it.record, vocab)) for it in rows]
            T, k = max([p[0].shape[0] for p in parts] + [1]), parts[0][0].shape[1]
            top, cols, tail = torch.zeros(len(parts), T, k), torch.full((len(parts), T, k), -1), torch.zeros(len(parts), T)
            for b, (log_p, col, tail_p) in enumerate(parts):
                top[b, : log_p.shape[0]], cols[b, : log_p.shape[0]], tail[b, : log_p.shape[0]] = log_p, col, tail_p
            _, mask = pad_right(outputs, 0, self.device)
            inside = cols[:, : mask.shape[1], 0] >= 0  # the target's argmax is on the shortlist
            return tuple(t.to(self.device) for t in (top, cols, tail)), mask.bool() & inside.to(self.device)
        if c.teacher_logits == "cache" and c.distill_method != "on_policy":
            dense = [load_topk_logits(self.pseudo_dir, it.record, vocab) for it in rows]
            out = torch.zeros(len(dense), max([d.shape[0] for d in dense] + [1]), vocab)
            for b, d in enumerate(dense):
                out[b, : d.shape[0]] = d
            _, mask = pad_right(outputs, 0, self.device)
            return out.to(self.device), mask.bool()
        with torch.no_grad(), self._autocast():
            logits, mask = teacher_forced_logits(self.teacher, sources, outputs, device=self.device)
        if short is None:
            return logits.float(), mask
        logits, inside = short.teacher(logits.float())
        return logits, mask & inside

    def _cross_entropy(self, logits, mask, seqs):
        """CE of the student's logits [B,T,·] on the target ids ``seqs`` (a shortlisted head: on
        their head rows, ids outside the shortlist ignored); returns (loss, the mask used)."""
        labels = _labels(seqs, logits.shape[1], self.device)
        short = getattr(self.student, "shortlist", None)
        if short is not None:
            labels = short.labels(labels)
            mask = mask & (labels >= 0)
        return masked_cross_entropy(logits.flatten(0, 1), labels.flatten(), mask.flatten()), mask

    def _loss(self, rows: List[TrainItem]):
        c = self.config
        sources = [it.source_ids for it in rows]
        parts = {"ce": torch.zeros((), device=self.device), "kd": torch.zeros((), device=self.device)}
        tokens = 0
        if c.loss > 0:
            labeled = [it for it in rows if it.reference_ids]
            if labeled:
                with self._autocast():
                    logits, mask = self.student.logits(self.module, [it.source_ids for it in labeled], [it.reference_ids for it in labeled], self.device)
                parts["ce"], mask = self._cross_entropy(logits, mask, [it.reference_ids for it in labeled])
                tokens += int(mask.sum())
        if c.kd_loss > 0:
            if c.distill_method == "seq_kd":
                with self._autocast():
                    logits, mask = self.student.logits(self.module, sources, [it.output_ids for it in rows], self.device)
                parts["kd"], mask = self._cross_entropy(logits, mask, [it.output_ids for it in rows])
            else:
                if c.distill_method == "on_policy":
                    outputs = self.student.sample(sources, c.on_policy_max_new_tokens, self.device)
                    name = c.on_policy_divergence
                else:
                    # the target's outputs when the data has them (even empty ones), else the references
                    outputs = [it.output_ids if it.output_ids is not None else (it.reference_ids or []) for it in rows]
                    name = c.distill_method
                teacher, t_mask = self._teacher_logits(sources, outputs, rows)
                with self._autocast():
                    logits, mask = self.student.logits(self.module, sources, outputs, self.device)
                mask = mask & t_mask[:, : mask.shape[1]]
                if isinstance(teacher, tuple):  # a sparse top-k teacher on a shortlisted head
                    top, cols, tail = (t[:, : logits.shape[1]] for t in teacher)
                    parts["kd"] = sparse_teacher_divergence(name, top.flatten(0, 1), cols.flatten(0, 1), tail.flatten(),
                                                            logits.flatten(0, 1), mask.flatten(), c.kd_temp)
                else:
                    teacher = teacher[:, : logits.shape[1]]
                    parts["kd"] = divergence(name, teacher.flatten(0, 1), logits.flatten(0, 1), mask.flatten(), c.kd_temp)
            tokens += int(mask.sum())
        total = c.loss * parts["ce"] + c.kd_loss * parts["kd"]
        return total, parts, tokens

    def _rows_for_step(self, step: int) -> List[TrainItem]:
        indices = _batch_indices(step, self.config.batch_size, len(self.items), self.config.seed, self._perm_cache)
        return [self.items[i] for i in indices[self.info.rank :: self.info.world_size]]

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": self.config.resume_key(), "num_items": len(self.items)}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save(self) -> Optional[str]:
        if not self.info.is_main or self.ckpt_root is None:
            return None
        return save_checkpoint(self.ckpt_root, self.step, self.student.module.state_dict(), self.optimizer, self._trainer_state(), self.config.keep_checkpoints)

    def resume(self) -> bool:
        """Load the latest checkpoint in out_dir; False when there is none."""
        if self.ckpt_root is None:
            raise CheckpointError("--resume needs an output folder")
        folder = latest_checkpoint(self.ckpt_root)
        if folder is None:
            return False
        model_state, opt_state, state = load_checkpoint(folder)
        if state["config"] != self.config.resume_key() or state["num_items"] != len(self.items):
            ours, theirs = self.config.resume_key(), state["config"]
            changed = sorted(k for k in ours if ours.get(k) != theirs.get(k)) or ["the training data"]
            raise CheckpointError(f"cannot --resume {folder}: it was trained with different {', '.join(changed)}")
        try:
            self.student.module.load_state_dict({k: v.to(self.device) for k, v in model_state.items()}, strict=True)
            self.optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{folder} does not fit this drafter: {err}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["step"]
        if self.info.is_main:
            self._truncate_logs(self.step)
        return True

    def _truncate_logs(self, step: int) -> None:
        """Drop log rows written after the checkpoint we resume from (they will be redone)."""
        if os.path.exists(self.log_jsonl):
            with open(self.log_jsonl, encoding="utf-8") as handle:
                rows = [json.loads(l) for l in handle if l.strip()]
            rows = [r for r in rows if r["step"] <= step]
            with open(self.log_jsonl, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in rows)
            with open(self.log_csv, "w", encoding="utf-8", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)

    def _log(self, row: dict) -> None:
        if not self.info.is_main or self.log_jsonl is None:
            return
        with open(self.log_jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        new = not os.path.exists(self.log_csv)
        with open(self.log_csv, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        c = self.config
        if c.out_dir:
            os.makedirs(c.out_dir, exist_ok=True)
        history: List[dict] = []
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"train rank {self.info.rank}", disable=not (c.progress and self.info.is_main))
        loss_value = float("nan")
        self.module.train()
        while self.step < c.max_steps:
            started = time.perf_counter()
            torch.manual_seed(c.seed * 1_000_003 + self.step)  # dropout / on-policy sampling, resume-exact
            rows = self._rows_for_step(self.step)
            total, parts, tokens = self._loss(rows)
            self.optimizer.zero_grad(set_to_none=True)
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = 0.0
            if c.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.module.parameters(), c.grad_clip))
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            loss_value = float(total.detach())
            row = {
                "step": self.step, "loss": loss_value, "ce": float(parts["ce"].detach()), "kd": float(parts["kd"].detach()), "lr": lr,
                "grad_norm": grad_norm, "tokens": tokens, "time_s": round(time.perf_counter() - started, 4),
            }
            if self.eval_fn is not None and self.info.is_main and (
                (c.eval_every and self.step % c.eval_every == 0) or self.step == c.max_steps
            ):
                self.module.eval()
                row["eval_alpha"] = self.eval_fn(self.step).get("alpha")
                self.module.train()
            self._log(row)
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if (c.ckpt_every and self.step % c.ckpt_every == 0) or self.step == c.max_steps:
                self.save()
            if self.on_step_end is not None:
                self.on_step_end(self.step)
        bar.close()
        self.module.eval()
        if self.save_fn is not None and self.info.is_main and c.out_dir:
            self.save_fn(os.path.join(c.out_dir, "drafter"))
        return TrainResult(self.step, loss_value, self.log_jsonl, history)


def _labels(seqs: Sequence[Sequence[int]], width: int, device) -> torch.Tensor:
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        labels[b, : len(s)] = torch.as_tensor(list(s)[:width])
    return labels.to(device)


# --------------------------------------------------------------------------- entry points


def items_from_records(records: Sequence[dict]) -> List[TrainItem]:
    """Pseudo-dataset records (or dicts with source_ids / reference_ids / output_ids)."""
    return [
        TrainItem(index=i, source_ids=list(r["source_ids"]), reference_ids=r.get("reference_ids"),
                  output_ids=r.get("output_ids"), record=r)
        for i, r in enumerate(records)
    ]


def training_metadata(config: TrainConfig, **extra) -> dict:
    """What eval reports show: baseline (no KD) vs distilled (method)."""
    meta = {"drafter": config.drafter, "loss": config.loss, "kd_loss": config.kd_loss,
            "distill_method": config.distill_method if config.kd_loss > 0 else None,
            "kd_temp": config.kd_temp if config.kd_loss > 0 else None, "steps": config.max_steps}
    meta.update(extra)
    return meta


def stamp_training(folder: str, training: dict) -> None:
    """Record how the drafter was trained in its config.json (``config.training``)."""
    update_config(folder, "training", training)


def acceptance_eval_fn(target, student, prompts: Sequence[Sequence[int]], *, gamma: int, max_new_tokens: int, device):
    """eval_fn for the Trainer: α of the current student as a drafter on ``prompts`` (greedy)."""
    model = introspect.hf_model(target)
    pad = pad_right if introspect.is_encoder_decoder(model) else pad_left
    ids, mask = pad(prompts, introspect.pad_token_id(model), device)

    def run(step: int) -> dict:
        with torch.no_grad():
            out = engine.generate(model, student.as_drafter(), input_ids=ids, attention_mask=mask, gamma=gamma,
                                    max_new_tokens=max_new_tokens, do_sample=False)
        return {"alpha": float(out.metrics["acceptance_rate"])}

    return run


def fit_ngram_drafter(records: Sequence[dict], vocab: int, n: int, *, use_references: bool, use_outputs: bool,
                      start_token_id: Optional[int] = None, smoothing: float = 1.0) -> NgramDrafter:
    """``--drafter ngram``: counts on references (baseline) and/or the target's outputs (distilled:
    records of a pseudo-dataset, :func:`fastspec.distill.pseudo.load_pseudo_dataset`)."""
    sequences = []
    for r in records:
        if use_references and r.get("reference_ids"):
            sequences.append(r["reference_ids"])
        if use_outputs and r.get("output_ids"):
            sequences.append(r["output_ids"])
    if not sequences:
        raise TrainingError("no sequences to fit the n-gram drafter on (references or pseudo outputs)")
    drafter = NgramDrafter.create(n, vocab, smoothing=smoothing, start_token_id=start_token_id)
    drafter.fit(sequences)
    return drafter


def train_drafter(target, records: Sequence[dict], config: TrainConfig, *, progress: bool = True, init_from=None,
                  drafter_options: Optional[dict] = None, dist_info: Optional[DistInfo] = None, pseudo_dir=None,
                  eval_prompts=None, gamma: int = 5, eval_max_new_tokens: int = 32, resume: bool = False,
                  ngram_n: int = 4):
    """Train (or fit) a drafter of kind ``config.drafter`` for ``target``; returns the drafter.

    records: dicts with ``source_ids`` and ``reference_ids`` and/or ``output_ids`` (a loaded
    pseudo-dataset, or encoded examples).
    drafter_options: the drafter's sizes; for cnn/lstm/layer_skip, ``shortlist`` (int, default
    :data:`~fastspec.distill.students.DEFAULT_SHORTLIST`; 0 = a full head) heads the drafter with the
    most frequent labels it trains on (:func:`~fastspec.distill.students.label_shortlist`) plus EOS.
    """
    config.progress = progress
    model = introspect.hf_model(target)
    if config.drafter == "ngram":
        start = introspect.decoder_start_token_id(model)  # None for causal targets
        drafter = fit_ngram_drafter(records, introspect.vocab_size(model), ngram_n, use_references=config.loss > 0,
                                    use_outputs=config.kd_loss > 0, start_token_id=start)
        if config.out_dir:
            folder = os.path.join(config.out_dir, "drafter")
            drafter.save(folder)
            meta = training_metadata(config, ngram_n=ngram_n)
            if config.kd_loss > 0:  # counts of the target's outputs: sequence-level KD, whatever --distill_method says
                meta["distill_method"] = "seq_kd"
            stamp_training(folder, meta)
        return drafter
    options = dict(drafter_options or {})
    if config.drafter in SHORTLISTED_KINDS and not init_from:  # a head over the records' most frequent labels (+ EOS)
        options["shortlist"] = label_shortlist(records, options.pop("shortlist", DEFAULT_SHORTLIST),
                                               introspect.vocab_size(model), introspect.eos_token_ids(model),
                                               references=config.loss > 0, outputs=config.kd_loss > 0)
    student = build_student(config.drafter, model, init_from=init_from, options=options, seed=config.seed)
    info = dist_info or DistInfo(0, 1, 0, torch.device("cpu"))
    eval_fn = None
    if eval_prompts:
        eval_fn = acceptance_eval_fn(model, student, eval_prompts, gamma=gamma, max_new_tokens=eval_max_new_tokens, device=info.device)

    def save_fn(folder):
        student.save_drafter(folder)
        stamp_training(folder, training_metadata(config, pseudo_dataset=pseudo_dir))

    trainer = Trainer(student, items_from_records(records), config, teacher=model, dist_info=info, eval_fn=eval_fn,
                      save_fn=save_fn, pseudo_dir=pseudo_dir)
    if resume and not trainer.resume():
        raise CheckpointError(f"--resume: no checkpoint under {trainer.ckpt_root}")
    trainer.train()
    return student.as_drafter()


def fit_neural_drafter(drafter, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], *, max_steps: int = 200,
                batch_size: int = 16, lr: float = 3e-3, seed: int = 0, progress: bool = False,
                eos_ids: Sequence[int] = (), **config) -> TrainResult:
    """Cross-entropy training of a CNN/LSTM drafter on (source, output) pairs, in place.
    ``config``: more :class:`TrainConfig` fields."""
    items = [TrainItem(index=i, source_ids=list(s), reference_ids=list(o)) for i, (s, o) in enumerate(zip(sources, outputs))]
    train_config = TrainConfig(drafter=drafter.kind, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                               progress=progress, ckpt_every=0, **config)
    drafter.model.train()
    try:
        return Trainer(NeuralStudent(drafter, eos_ids), items, train_config).train()
    finally:
        drafter.model.eval()
