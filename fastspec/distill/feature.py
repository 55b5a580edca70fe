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

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastspec import introspect
from fastspec.distill.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fastspec.distill.losses import DIVERGENCES, divergence
from fastspec.distill.pseudo import strip_output
from fastspec.distill.teacher import pad_left, pad_right
from fastspec.drafters.feature import DEFAULT_LAYERS, FeatureDrafter, FeatureModel
from fastspec.errors import UserError
from fastspec.files import atomic_write_text

Pair = Tuple[List[int], List[int]]  # (prompt ids, output ids)
DATA_FORMAT = "fastspec-feature-data"
DATA_VERSION = 1
_FIELDS = ("tokens", "features", "last", "top_values", "top_ids", "lse", "encoder")


# ---------------------------------------------------------------------------------- pairs


def pseudo_pairs(target, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, batch_size: int = 8,
                 progress: bool = False) -> List[Pair]:
    """(prompt, the target's own greedy output) per prompt, via ``fastspec.generate(target, None, ...)``.

    prompts: token lists (causal: the full prompt; seq2seq: the encoder input).
    """
    from tqdm.auto import tqdm

    from fastspec.engine import generate

    model = introspect.hf_model(target)
    pad, eos = introspect.pad_token_id(model), introspect.eos_token_ids(model)
    seq2seq = introspect.is_encoder_decoder(model)
    pairs: List[Pair] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="pseudo outputs", disable=not progress):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        ids, mask = (pad_right if seq2seq else pad_left)(chunk, pad, introspect.model_device(model))
        out = generate(model, None, ids, mask, max_new_tokens=max_new_tokens, do_sample=False).sequences
        new = out[:, 1:] if seq2seq else out[:, ids.shape[1]:]  # drop the decoder start / the prompt
        pairs += [(p, strip_output(row.tolist(), eos, pad)) for p, row in zip(chunk, new)]
    return pairs


def reference_pairs(tokenizer, prompts: Sequence[Sequence[int]], references: Sequence[str]) -> List[Pair]:
    """(prompt, tokenized reference text + EOS): cheap training data with no generation."""
    if len(prompts) != len(references):
        raise UserError(f"{len(prompts)} prompts but {len(references)} reference texts")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(list(p), tokenizer(r, add_special_tokens=False)["input_ids"] + eos) for p, r in zip(prompts, references)]


# ---------------------------------------------------------------------------------- data


@dataclass
class FeatureSequence:
    """One teacher-forced decoder sequence.

    tokens: [T] int64 the decoder sequence (causal: prompt + output; seq2seq: start + output).
    prompt_len: tokens before the output. features: [T,H'] the selected layers (fp16).
    last: [T,H] the last hidden state (fp16), None when it is the last block of ``features``.
    top_values / top_ids: [T,k] the target's k largest logits and ids; lse: [T] logsumexp of all.
    encoder: [S,H] the encoder's last hidden state (seq2seq), else None.
    """

    tokens: torch.Tensor
    prompt_len: int
    features: torch.Tensor
    last: Optional[torch.Tensor]
    top_values: torch.Tensor
    top_ids: torch.Tensor
    lse: torch.Tensor
    encoder: Optional[torch.Tensor] = None

    def last_features(self, hidden: int) -> torch.Tensor:
        return self.last if self.last is not None else self.features[:, -hidden:]


@dataclass
class FeatureData:
    """Teacher-forced training data for one target and one set of feature layers."""

    sequences: List[FeatureSequence]
    layers: Tuple[int, ...]
    hidden_size: int
    vocab_size: int
    topk: int
    fingerprint: str = ""
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(int(s.tokens.numel()) for s in self.sequences)

    def save(self, folder: str, shard_tokens: int = 1 << 18) -> None:
        """fp16 safetensors shards (``shard-NNNNN.safetensors``) + ``index.json``, written last."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        shards, group, size = [], [], 0
        for seq in self.sequences + [None]:
            if seq is not None:
                group.append(seq)
                size += int(seq.tokens.numel())
            if group and (seq is None or size >= shard_tokens):
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(_pack(group), os.path.join(folder, name))
                shards.append({"file": name, "sequences": len(group)})
                group, size = [], 0
        index = {"format": DATA_FORMAT, "version": DATA_VERSION, "layers": list(self.layers),
                 "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "topk": self.topk,
                 "fingerprint": self.fingerprint, "stats": self.stats, "shards": shards}
        atomic_write_text(os.path.join(folder, "index.json"), json.dumps(index, indent=1))

    @classmethod
    def load(cls, folder: str) -> "FeatureData":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = os.path.join(folder, "index.json")
        try:
            with open(path, encoding="utf-8") as handle:
                index = json.load(handle)
            if index.get("format") != DATA_FORMAT or index.get("version") != DATA_VERSION:
                raise UserError(f"{path} is not a fastspec feature-data index (version {DATA_VERSION})")
            sequences = []
            for shard in index["shards"]:
                sequences += _unpack(load_file(os.path.join(folder, shard["file"])))
        except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as err:
            raise UserError(f"corrupt or incomplete feature data in {folder!r}: {err}") from None
        return cls(sequences, tuple(index["layers"]), index["hidden_size"], index["vocab_size"], index["topk"],
                   index["fingerprint"], index.get("stats", {}))


def _pack(group: Sequence[FeatureSequence]) -> Dict[str, torch.Tensor]:
    """Concatenate sequences (fields with None are stored as empty) plus their offsets."""
    tensors = {"prompt_len": torch.tensor([s.prompt_len for s in group], dtype=torch.long)}
    for name in _FIELDS:
        parts = [getattr(s, name) for s in group]
        lengths = [0 if p is None else int(p.shape[0]) for p in parts]
        tensors[f"{name}.offsets"] = torch.tensor([0] + lengths, dtype=torch.long).cumsum(0)
        present = [p for p in parts if p is not None]
        if present:
            tensors[name] = torch.cat(present).contiguous()
    return tensors


def _unpack(tensors: Dict[str, torch.Tensor]) -> List[FeatureSequence]:
    out = []
    for row, prompt_len in enumerate(tensors["prompt_len"].tolist()):
        values = {}
        for name in _FIELDS:
            lo, hi = tensors[f"{name}.offsets"][row: row + 2].tolist()
            values[name] = tensors[name][lo:hi] if hi > lo else None
        out.append(FeatureSequence(prompt_len=prompt_len, **values))
    return out


def _fingerprint(model, pairs: Sequence[Pair], layers, topk: int, max_length: int) -> str:
    """Identifies the data: the pairs, the settings and the target (config + LM-head checksum)."""
    digest = hashlib.sha256(json.dumps([list(layers), topk, max_length, model.config.to_json_string()]).encode())
    digest.update(str(float(model.get_output_embeddings().weight.double().sum())).encode())
    for prompt, output in pairs:
        digest.update(json.dumps([list(map(int, prompt)), list(map(int, output))]).encode())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(target, pairs: Sequence[Pair], *, layers: Sequence[int] = DEFAULT_LAYERS, topk: int = 32,
                     batch_size: int = 4, max_length: int = 512, cache_dir: Optional[str] = None,
                     progress: bool = True) -> FeatureData:
    """Teacher-force ``target`` over prompt + output (no grad, in batches): its features at
    ``layers`` (indices into ``outputs.hidden_states``), its last hidden state and top-k logits.

    Causal rows longer than ``max_length`` keep their last ``max_length`` tokens. With
    ``cache_dir``, data made earlier from the same pairs/settings/target is loaded from there,
    else it is written there. ``stats["tokens_per_s"]`` reports the extraction speed.
    """
    from tqdm.auto import tqdm

    model = introspect.hf_model(target)
    layers = tuple(int(i) for i in layers)
    fingerprint = _fingerprint(model, pairs, layers, topk, max_length)
    if cache_dir is not None and os.path.exists(os.path.join(cache_dir, "index.json")):
        cached = FeatureData.load(cache_dir)
        if cached.fingerprint == fingerprint:
            return cached
        raise UserError(f"{cache_dir!r} holds feature data made from other pairs, settings or target; "
                        "use another cache folder")
    seq2seq = introspect.is_encoder_decoder(model)
    hidden = int(introspect.text_config(model).hidden_size)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # less padding
    sequences: List[Optional[FeatureSequence]] = [None] * len(pairs)
    start_time, tokens = time.perf_counter(), 0
    for lo in tqdm(range(0, len(order), batch_size), desc="features", disable=not progress):
        rows = order[lo:lo + batch_size]
        batch = [pairs[i] for i in rows]
        for i, seq in zip(rows, _extract_batch(model, batch, layers, topk, max_length, seq2seq, hidden)):
            sequences[i] = seq
            tokens += int(seq.tokens.numel())
    elapsed = time.perf_counter() - start_time
    stats = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9)}
    if progress:
        print(f"feature extraction: {tokens} tokens in {elapsed:.1f} s ({stats['tokens_per_s']:.0f} tokens/s)")
    data = FeatureData(sequences, layers, hidden, introspect.vocab_size(model), topk, fingerprint, stats)
    if cache_dir is not None:
        data.save(cache_dir)
    return data


def _extract_batch(model, batch: Sequence[Pair], layers, topk, max_length, seq2seq, hidden) -> List[FeatureSequence]:
    device, pad = introspect.model_device(model), introspect.pad_token_id(model)
    if seq2seq:
        start = introspect.decoder_start_token_id(model)
        rows = [[start] + list(out)[: max_length - 1] for _, out in batch]
        prompt_lens = [1] * len(batch)
        src, src_mask = pad_right([p for p, _ in batch], pad, device)
        dec, dec_mask = pad_right(rows, pad, device)
        out = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                    output_hidden_states=True)
        states, encoder = out.decoder_hidden_states, out.encoder_last_hidden_state
    else:
        rows = [(list(p) + list(o))[-max_length:] for p, o in batch]
        prompt_lens = [max(len(p) - max(len(p) + len(o) - max_length, 0), 0) for p, o in batch]
        ids, mask = pad_right(rows, pad, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True)
        states, encoder, src_mask = out.hidden_states, None, None
    features = torch.cat([states[i] for i in layers], dim=-1)  # [B,T,H']
    logits = out.logits.float()  # [B,T,V]
    values, ids_top = logits.topk(min(topk, logits.shape[-1]), dim=-1)  # [B,T,k]
    lse = logits.logsumexp(-1)  # [B,T]
    last = None if layers[-1] in (-1, len(states) - 1) else states[-1]
    result = []
    for b, row in enumerate(rows):
        n = len(row)
        result.append(FeatureSequence(
            tokens=torch.tensor(row, dtype=torch.long), prompt_len=prompt_lens[b],
            features=features[b, :n].half().cpu(), last=None if last is None else last[b, :n].half().cpu(),
            top_values=values[b, :n].half().cpu(), top_ids=ids_top[b, :n].int().cpu(), lse=lse[b, :n].cpu(),
            encoder=None if encoder is None else encoder[b, src_mask[b].bool()].half().cpu(),
        ))
    return result


# ---------------------------------------------------------------------------------- shortlist


def label_counts(data: FeatureData, loss_on_prompt: bool = False) -> torch.Tensor:
    """[V] int64: how often each id is the target's argmax at a trained position."""
    counts = torch.zeros(data.vocab_size, dtype=torch.long)
    for seq in data.sequences:
        first = 1 if loss_on_prompt else max(1, seq.prompt_len - 1)  # position j predicts token j+1
        counts += torch.bincount(seq.top_ids[first:, 0].long(), minlength=data.vocab_size)
    return counts


def build_shortlist(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """[≤size] int64 target ids: the most frequent labels of ``counts`` [V] (ties by id), then any of
    ``always`` (e.g. EOS) that missed the cut, in place of the least frequent ones."""
    if size < 1:
        raise UserError(f"shortlist size must be ≥ 1, got {size}")
    order = torch.argsort(-counts, stable=True)
    seen = order[counts[order] > 0][:size].tolist()
    missing = [int(i) for i in always if int(i) not in seen]
    keep = seen[: max(size - len(missing), 0)] + missing[:size]
    return torch.tensor(keep, dtype=torch.long)


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


def shortlist_teacher_logits(values, ids, lse, draft_index: torch.Tensor, size: int) -> torch.Tensor:
    """Teacher log-probs on the shortlist [N,size] from a top-k cache (values/ids [N,k], lse [N]).

    draft_index: [V] target id -> draft id (−1 outside). Ids outside the top k share the tail
    mass evenly, as in :func:`fastspec.distill.losses.topk_to_logits`.
    """
    log_p = values - lse[:, None]  # [N,k]
    vocab, k = draft_index.numel(), values.shape[1]
    tail = torch.log((1.0 - log_p.exp().sum(-1)).clamp_min(1e-12) / max(vocab - k, 1))  # [N]
    dense = tail[:, None].expand(-1, size + 1).clone()  # column `size` collects ids outside the shortlist
    slot = draft_index[ids]
    return dense.scatter(1, torch.where(slot >= 0, slot, size), log_p)[:, :size]


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
        teacher = shortlist_teacher_logits(top_values[mask], top_ids[mask], lse[mask], draft_index,
                                           model.head.out_features)
        in_short = draft_index[top_ids[mask][:, 0]] >= 0  # target argmax inside the shortlist
        token = divergence(divergence_name, teacher, model.head(predicted).float(), in_short, temperature=temperature)
        per_step.append(feature_weight * regression + divergence_weight * token)
    total = sum(w * loss for w, loss in zip(unroll_weights(len(per_step), decay), per_step))
    return total, per_step


def _draft_index(model: FeatureModel) -> torch.Tensor:
    """[V] target id -> draft id, −1 outside the shortlist."""
    ids = model.shortlist_ids
    index = torch.full((model.vocab_size,), -1, dtype=torch.long, device=ids.device)
    index[ids] = torch.arange(ids.numel(), device=ids.device)
    return index


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
    train_head: bool = True
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
