"""Training the FeatureDrafter (fastspec/drafters/feature.py): data, shortlist, losses, loop.

Pipeline (each step is a function the CLI/demo/eval can call on its own)::

    pairs = pseudo_pairs(target, prompts)                    # the target's own greedy outputs
          | reference_pairs(tokenizer, prompts, texts)       # or reference texts (no generation)
    data  = extract_features(target, pairs, layers=(-1,))    # teacher-forced features + top-k logits
    short = build_shortlist(label_counts(data), 8192, eos)   # the N most frequent target argmaxes
    drafter = train_feature_drafter(target, pairs, FeatureTrainConfig(...), data=data)
    agreement(drafter.model, held_out_data)                  # per-depth agreement with the target

Loss per unrolled step j ("training-time test", EAGLE-3): the drafter is fed its own predicted
features for j steps and, at each position, is scored on the next feature (smooth L1 against the
target's last hidden state) and the next token (a divergence from
:mod:`fastspec.distill.losses` against the target's distribution restricted to the shortlist;
positions whose target argmax is outside the shortlist are masked). Step j weighs ``decay**j``.

A training step runs on windows (:func:`window_sequence`): each row's loss positions (its output)
plus at most ``context_window`` earlier positions, fed the target's full-context features; prompt
positions before the window cost nothing in the drafter's layer (they dominated the cost before).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastspec import introspect
from fastspec.distill.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fastspec.distill.losses import DIVERGENCES, sparse_teacher_divergence
from fastspec.drafters.feature import DEFAULT_LAYERS, FeatureDrafter, FeatureModel
from fastspec.drafters.shortlist import draft_index
from fastspec.errors import UserError

from fastspec.distill.feature_data import (  # noqa: F401  (the data side, re-exported)
    FeatureData, FeatureSequence, Pair, build_shortlist, extract_features, label_counts, pseudo_pairs, reference_pairs,
)


# ---------------------------------------------------------------------------------- losses


def unroll_weights(steps: int, decay: float = 0.8) -> List[float]:
    """Loss weight of unrolled step i: decay**i (EAGLE-3's training-time test)."""
    return [decay ** i for i in range(steps)]


@dataclass
class Batch:
    """Padded training rows. tokens: [B,T] (−1 pad); lengths, prompt_lens: [B]; features: [B,T,H'];
    last: [B,T,H]; top_values/top_ids: [B,T,k]; lse: [B,T]; encoder: [B,S,H] + encoder_mask [B,S]."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    features: torch.Tensor
    last: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor
    lse: torch.Tensor
    encoder: Optional[torch.Tensor] = None
    encoder_mask: Optional[torch.Tensor] = None


def collate(seqs: Sequence[FeatureSequence], hidden: int, device=None, dtype=torch.float32) -> Batch:
    def pad(tensors, value=0.0):
        return torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True, padding_value=value).to(device)

    encoder = encoder_mask = None
    if seqs[0].encoder is not None:
        encoder = pad([s.encoder for s in seqs]).to(dtype)
        encoder_mask = pad([torch.ones(s.encoder.shape[0]) for s in seqs])
    return Batch(
        tokens=pad([s.tokens for s in seqs], -1).long(),
        lengths=torch.tensor([s.tokens.numel() for s in seqs], device=device),
        prompt_lens=torch.tensor([s.prompt_len for s in seqs], device=device),
        features=pad([s.features for s in seqs]).to(dtype),
        last=pad([s.last_features(hidden) for s in seqs]).to(dtype),
        top_values=pad([s.top_values for s in seqs]).float(), top_ids=pad([s.top_ids for s in seqs]).long(),
        lse=pad([s.lse for s in seqs]).float(), encoder=encoder, encoder_mask=encoder_mask,
    )


def window_sequence(seq: FeatureSequence, context_window: Optional[int], steps: int = 1,
                    loss_on_prompt: bool = False) -> FeatureSequence:
    """The training window of ``seq``: its loss positions plus at most ``context_window`` positions
    before them (None = the whole sequence). The features stay the target's FULL-context ones (they
    were extracted once over the whole sequence); only the drafter's own layer loses the positions
    before the window, i.e. its attention sees the window alone.

    Position i trains on token i+2 (see :func:`unrolled_outputs`), so the first loss position is
    ``prompt_len − 2``; the window keeps at least ``steps − 1`` positions before it so that every
    unrolled pass keeps all its loss positions. RoPE (Llama) and T5's relative bias depend only on
    position differences, so renumbering the window from 0 changes nothing else: with a window that
    covers the whole prompt the loss is unchanged.

    Train/inference mismatch: at inference the drafter's layer attends over the whole prompt. With
    a window it is trained with at most ``context_window`` earlier slots. This is acceptable because
    the long-range context already reaches it through the target's features (each f_i is computed by
    the target over the full prefix); the drafter's one layer mostly needs the recent tokens and its
    own unrolled slots, which the window keeps. Agreement (:func:`agreement`) is measured with full
    context, as at inference. Loss on the prompt (``loss_on_prompt``) and seq2seq sequences (whose
    decoder prompt is one start token) are never cropped.
    """
    if context_window is None or loss_on_prompt:
        return seq
    first_loss = max(seq.prompt_len - 2, 0)
    start = max(first_loss - max(int(context_window), steps - 1), 0)
    if start == 0:
        return seq
    return FeatureSequence(
        tokens=seq.tokens[start:], prompt_len=seq.prompt_len - start, features=seq.features[start:],
        last=None if seq.last is None else seq.last[start:], top_values=seq.top_values[start:],
        top_ids=seq.top_ids[start:], lse=seq.lse[start:], encoder=seq.encoder)


def layer_positions(batch: Batch, steps: int) -> int:
    """Query positions the drafter's layer processes for ``batch`` over ``steps`` unrolled passes
    (padding included): the cost measure of a training step."""
    B, T = batch.tokens.shape
    return steps * B * max(T - 1, 0)


def unrolled_outputs(model: FeatureModel, batch: Batch, steps: int, loss_on_prompt: bool = False):
    """Teacher-forced drafter passes, each fed the previous pass's predicted features.

    Pass j at position i reads (g_i, emb(t_{i+1})) with g_i = the target's (fused) feature for j = 0
    and the pass j−1 prediction made at position i−1 otherwise; its attention sees, as at inference
    after j drafted tokens, the real slots ≤ i−j and the slot of position i−j+s from pass s (1 ≤ s ≤ j).
    Returns [(predicted features [B,T−1,h], loss mask [B,T−1])] per pass: position i predicts the
    feature at i+1 and the token at i+2.
    """
    tokens = batch.tokens
    B, T = tokens.shape
    n = T - 1
    device = tokens.device
    pos = torch.arange(n, device=device)
    region = pos[None, :] < (batch.lengths - 1)[:, None]  # [B,n] position i has a token i+1
    if not loss_on_prompt:
        region &= (pos[None, :] + 2) >= batch.prompt_lens[:, None]  # token i+2 is an output token
    next_ids = tokens[:, 1:]  # [B,n]
    g = model.fuse_features(batch.features[:, :n])  # [B,n,h]
    kv = model.new_cache()
    cross = None
    if model.arch == "t5":
        from transformers.cache_utils import DynamicCache

        cross = DynamicCache()
    q_pos = pos[None, :].expand(B, n)
    results = []
    for j in range(steps):
        if j > 0:
            g = torch.cat([torch.zeros_like(g[:, :1]), results[-1][0][:, :-1]], dim=1)
        blocks = [pos[None, :] <= pos[:, None] - j]  # [n,n] real slots
        blocks += [pos[None, :] == pos[:, None] - j + s for s in range(1, j + 1)]  # one slot per pass
        allowed = torch.cat(blocks, dim=1)[None].expand(B, -1, -1)  # [B,n,(j+1)n]
        key_pos = pos.repeat(j + 1)[None].expand(B, -1)
        out = model.run_layer(model.step_input(g, next_ids), q_pos, key_pos, allowed, kv, cross,
                              batch.encoder, batch.encoder_mask)
        results.append((out, region & (pos[None, :] >= j)))
    return results


def shortlist_topk_teacher(values, ids, lse, draft_index: torch.Tensor):
    """A top-k cache (values/ids [N,k], lse [N]) on the shortlist, sparse: (log-probs [N,k], their
    shortlist columns [N,k], −1 outside, and the tail log-prob [N]). Ids outside the top k share the
    tail mass evenly, as in :func:`fastspec.distill.losses.topk_to_logits`. draft_index: [V] target
    id -> draft id (−1 outside)."""
    log_p = values - lse[:, None]  # [N,k]
    vocab, k = draft_index.numel(), values.shape[1]
    tail = torch.log((1.0 - log_p.exp().sum(-1)).clamp_min(1e-12) / max(vocab - k, 1))  # [N]
    return log_p, draft_index[ids], tail


def unrolled_loss(model: FeatureModel, batch: Batch, *, steps: int = 3, decay: float = 0.8, feature_weight: float = 1.0,
                  divergence_name: str = "fkl", divergence_weight: float = 0.1, temperature: float = 1.0,
                  loss_on_prompt: bool = False):
    """Σ_j decay**j · (feature_weight · smooth L1 + divergence_weight · divergence) over unrolled passes.

    Returns (total loss, [per-pass loss tensors])."""
    if divergence_name not in DIVERGENCES:
        raise UserError(f"unknown divergence {divergence_name!r}; choose from {DIVERGENCES}")
    draft_index = _draft_index(model)
    # the targets of position i are at i+1: its next feature, the distribution of token i+2
    target_last, top_values, top_ids, lse = (t[:, 1:] for t in (batch.last, batch.top_values, batch.top_ids, batch.lse))
    per_step = []
    for out, mask in unrolled_outputs(model, batch, steps, loss_on_prompt):
        predicted = out[mask]  # [N,h]
        if predicted.shape[0] == 0:
            per_step.append(out.sum() * 0.0)
            continue
        regression = F.smooth_l1_loss(predicted.float(), target_last[mask].float())
        top_log_p, top_cols, tail = shortlist_topk_teacher(top_values[mask], top_ids[mask], lse[mask], draft_index)
        in_short = top_cols[:, 0] >= 0  # target argmax inside the shortlist
        token = sparse_teacher_divergence(divergence_name, top_log_p, top_cols, tail, model.head(predicted).float(),
                                          in_short, temperature=temperature)
        per_step.append(feature_weight * regression + divergence_weight * token)
    total = sum(w * loss for w, loss in zip(unroll_weights(len(per_step), decay), per_step))
    return total, per_step


def _draft_index(model: FeatureModel) -> torch.Tensor:
    """[V] target id -> draft id, −1 outside the shortlist."""
    return draft_index(model.shortlist_ids, model.vocab_size)


@torch.no_grad()
def agreement(model: FeatureModel, data: FeatureData, *, steps: int = 3, batch_size: int = 8,
              loss_on_prompt: bool = False) -> List[float]:
    """Per unrolled step j: how often the drafter's argmax (mapped to target ids) equals the target's
    argmax, teacher-forced (step 0 = the first draft token; step j = draft j+1 given j accepted)."""
    was_training = model.training
    model.eval()
    device = model.fc.weight.device
    hits, total = [0] * steps, [0] * steps
    for lo in range(0, len(data.sequences), batch_size):
        batch = collate(data.sequences[lo:lo + batch_size], data.hidden_size, device, model.fc.weight.dtype)
        labels = batch.top_ids[:, 1:, 0]  # [B,T-1] the target's argmax for token i+2
        for j, (out, mask) in enumerate(unrolled_outputs(model, batch, steps, loss_on_prompt)):
            guess = model.shortlist_ids[model.head(out[mask]).argmax(-1)]
            hits[j] += int((guess == labels[mask]).sum())
            total[j] += int(mask.sum())
    model.train(was_training)
    return [h / max(t, 1) for h, t in zip(hits, total)]


# ---------------------------------------------------------------------------------- training


@dataclass
class FeatureTrainConfig:
    """Settings of :func:`train_feature_drafter` (EAGLE defaults: 1.0 smooth L1 + 0.1 token term)."""

    feature_layers: Tuple[int, ...] = DEFAULT_LAYERS
    shortlist_size: int = 8192
    topk: int = 32
    unroll_steps: int = 3
    unroll_decay: float = 0.8
    feature_weight: float = 1.0
    divergence: str = "fkl"
    divergence_weight: float = 0.1
    temperature: float = 1.0
    loss_on_prompt: bool = False
    # EAGLE keeps the target's LM-head rows frozen: no weight gradient through the N-wide head, and on
    # SmolLM2/aclsum (600 s, pooled data) test agreement at depth 1 rose 0.252 -> 0.298 with lr 1e-3
    train_head: bool = False
    lr: float = 5e-4
    warmup_steps: int = 20
    lr_schedule: str = "constant"  # after warm-up: "constant", "linear" or "cosine" decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.1
    # training windows: the loss positions plus at most this many earlier positions (None = whole
    # sequences); features stay full-context, see window_sequence for the train/inference mismatch
    context_window: Optional[int] = 32
    # the first unroll_ramp fraction of the run (of max_steps or time_budget_s) trains 1 pass only
    unroll_ramp: float = 0.0
    # bf16 autocast of the drafter's forward on CPU; None = when the CPU has bf16 units (AMX/AVX512-BF16)
    bf16_autocast: Optional[bool] = None
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    batch_size: int = 8
    max_steps: Optional[int] = 1000
    time_budget_s: Optional[float] = None
    max_length: int = 512
    extract_batch_size: int = 4
    data_cache_dir: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 200
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise UserError(f"unknown divergence {self.divergence!r}; choose from {DIVERGENCES}")
        if self.max_steps is None and self.time_budget_s is None:
            raise UserError("give max_steps, time_budget_s or both")
        if self.unroll_steps < 1 or self.batch_size < 1:
            raise UserError("unroll_steps and batch_size must be ≥ 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {LR_SCHEDULES}")
        if self.context_window is not None and self.context_window < 0:
            raise UserError("context_window must be ≥ 0 (or None for whole sequences)")


LR_SCHEDULES = ("constant", "linear", "cosine")


def _lr_factor(cfg: FeatureTrainConfig, step: int, done: float) -> float:
    """Multiplier of cfg.lr at ``step`` with ``done`` ∈ [0,1] of the run behind: linear warm-up
    over warmup_steps, then the schedule's decay from 1 to min_lr_ratio as ``done`` goes 0 → 1."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    done = min(max(done, 0.0), 1.0)
    if cfg.lr_schedule == "linear":
        decay = 1.0 - done
    elif cfg.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * done))
    else:
        decay = 1.0
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay)


def _use_bf16_autocast(cfg: FeatureTrainConfig, device) -> bool:
    if torch.device(device).type != "cpu":
        return bool(cfg.bf16_autocast)
    if cfg.bf16_autocast is None:
        from fastspec.precision import cpu_has_bf16_units

        return cpu_has_bf16_units()
    return bool(cfg.bf16_autocast)


def train_feature_drafter(target, pairs: Optional[Sequence[Pair]] = None, config: FeatureTrainConfig = None, *,
                          data: Optional[FeatureData] = None) -> FeatureDrafter:
    """Train a FeatureDrafter for ``target`` on ``pairs`` (or on already extracted ``data``).

    AdamW with linear warm-up then ``lr_schedule``, seeded batches (step s draws from seed + s, so a
    resumed run sees the same batches), each row cropped to its training window
    (:func:`window_sequence`, ``context_window``), a step and/or time budget, tqdm progress, and
    atomic checkpoints in ``config.checkpoint_dir`` from which a rerun resumes. The drafter's
    ``train_stats`` records the run, incl. ``positions``: query positions run through the layer.
    """
    from tqdm.auto import tqdm

    cfg = config or FeatureTrainConfig()
    cfg.check()
    torch.manual_seed(cfg.seed)
    model_hf = introspect.hf_model(target)
    if data is None:
        if not pairs:
            raise UserError("train_feature_drafter needs pairs or data")
        data = extract_features(model_hf, pairs, layers=cfg.feature_layers, topk=cfg.topk,
                                batch_size=cfg.extract_batch_size, max_length=cfg.max_length,
                                cache_dir=cfg.data_cache_dir, progress=cfg.progress)
    shortlist = build_shortlist(label_counts(data, cfg.loss_on_prompt), cfg.shortlist_size,
                                introspect.eos_token_ids(model_hf))
    drafter = FeatureDrafter.from_target(model_hf, feature_layers=data.layers, shortlist=shortlist)
    model = drafter.model.float().train()
    model.head.weight.requires_grad_(cfg.train_head)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = _resume(cfg, model, optimizer)
    device = model.fc.weight.device
    bar = tqdm(total=cfg.max_steps, initial=step, desc="feature drafter", disable=not cfg.progress)
    autocast = _use_bf16_autocast(cfg, device)
    start, losses, positions = time.perf_counter(), [], 0

    def done() -> float:  # fraction of the run behind (whichever budget ends first)
        fractions = [0.0]
        if cfg.max_steps:
            fractions.append(step / cfg.max_steps)
        if cfg.time_budget_s:
            fractions.append((time.perf_counter() - start) / cfg.time_budget_s)
        return max(fractions)

    while (cfg.max_steps is None or step < cfg.max_steps) and (
            cfg.time_budget_s is None or time.perf_counter() - start < cfg.time_budget_s):
        draw = torch.Generator().manual_seed(cfg.seed + step)  # step s's batch does not depend on resuming
        rows = torch.randint(len(data.sequences), (cfg.batch_size,), generator=draw)
        behind = done()
        steps = 1 if behind < cfg.unroll_ramp else cfg.unroll_steps
        batch = collate([window_sequence(data.sequences[i], cfg.context_window, steps, cfg.loss_on_prompt)
                         for i in rows.tolist()], data.hidden_size, device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(cfg, step, behind)
        with torch.autocast("cpu" if torch.device(device).type == "cpu" else torch.device(device).type,
                            dtype=torch.bfloat16, enabled=autocast):
            loss, _ = unrolled_loss(model, batch, steps=steps, decay=cfg.unroll_decay,
                                    feature_weight=cfg.feature_weight, divergence_name=cfg.divergence,
                                    divergence_weight=cfg.divergence_weight, temperature=cfg.temperature,
                                    loss_on_prompt=cfg.loss_on_prompt)
        positions += layer_positions(batch, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if cfg.checkpoint_dir and step % cfg.checkpoint_every == 0:
            _checkpoint(cfg, model, optimizer, step)
    bar.close()
    if cfg.checkpoint_dir and losses:
        _checkpoint(cfg, model, optimizer, step)
    model.eval()
    drafter.train_stats = {"steps": step, "seconds": time.perf_counter() - start,
                           "final_loss": losses[-1] if losses else math.nan, "data": dict(data.stats),
                           "shortlist_size": int(shortlist.numel()), "positions": positions,
                           "context_window": cfg.context_window, "bf16_autocast": autocast}
    return drafter


def _checkpoint(cfg: FeatureTrainConfig, model: FeatureModel, optimizer, step: int) -> None:
    save_checkpoint(cfg.checkpoint_dir, step, model.state_dict(), optimizer,
                    {"step": step, "config": asdict(cfg), "model_config": model.config_dict()})


def _resume(cfg: FeatureTrainConfig, model: FeatureModel, optimizer) -> int:
    """Load the newest checkpoint of ``cfg.checkpoint_dir`` if any; returns the step to start from."""
    folder = latest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if folder is None:
        return 0
    state, opt_state, trainer_state = load_checkpoint(folder)
    if trainer_state.get("model_config") != json.loads(json.dumps(model.config_dict())):
        raise CheckpointError(f"{folder} was written for another drafter shape (layers, shortlist or target); "
                              "use another checkpoint_dir")
    model.load_state_dict(state, strict=True)
    optimizer.load_state_dict(opt_state)
    return int(trainer_state["step"])


__all__ = [
    "FeatureData", "FeatureSequence", "FeatureTrainConfig", "agreement", "build_shortlist", "extract_features",
    "label_counts", "layer_positions", "pseudo_pairs", "reference_pairs", "train_feature_drafter", "unroll_weights",
    "unrolled_loss", "window_sequence",
]
