"""The feature drafter's training data: (prompt, output) pairs, the target teacher-forced over them
(features at the chosen layers, last hidden state, top-k logits), their fp16 disk cache, and the
shortlist of the most frequent target labels. Training itself is :mod:`fastspec.distill.feature`."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastspec import introspect
from fastspec.distill.pseudo import strip_output
from fastspec.distill.teacher import pad_left, pad_right
from fastspec.drafters.feature import DEFAULT_LAYERS
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


def text_chunk_pairs(tokenizer, texts: Sequence[str], *, chunk: int = 256, budget: int = 100_000,
                     seq2seq: bool = False) -> List[Pair]:
    """Unlabeled text cut into ``chunk``-token pieces until ``budget`` tokens, teacher-forced as is
    (causal: the piece continues its first token; seq2seq: the decoder reads the encoder's piece)."""
    pairs: List[Pair] = []
    used = 0
    for text in texts:
        if used >= budget:
            break
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long on purpose: cut below
        for lo in range(0, len(ids) - 1, chunk):
            if used >= budget:
                break
            piece = ids[lo:lo + chunk]
            if len(piece) < 2:
                continue
            pairs.append((piece, piece) if seq2seq else (piece[:1], piece[1:]))
            used += len(piece)
    return pairs


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
