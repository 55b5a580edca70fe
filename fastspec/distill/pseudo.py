"""Pseudo-datasets: the target's own outputs on training sources.

Layout of ``out_dir``::

    meta.json                                settings + a fingerprint of the sources
    shards/part-RRRRR-of-WWWWW.jsonl         append-only records of rank R of W
    shards/part-RRRRR-of-WWWWW.cursor.json   {"batches_done", "records", "bytes"}
    logits/batch-BBBBBB.safetensors          optional top-k target logits per batch
    pseudo.jsonl                             the merged data set, sorted by index

Work is split into fixed global batches (batch b = sources [b·B, (b+1)·B)); batch b
goes to rank b mod W and is generated with seed ``seed + b``. Batch contents and
seeds therefore do not depend on W, so 1 process and N processes write the same
records, and the merge (sort by index) is byte-for-byte deterministic.

Resume: a batch is durable once its lines are flushed+fsynced *and* the cursor (written
atomically after them) counts it. On restart each rank truncates its shard to the
cursor's byte offset (dropping lines of an unacknowledged batch) and continues with the
next batch: nothing is duplicated and nothing is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastspec import engine, introspect
from fastspec.distill.distributed import DistInfo, barrier
from fastspec.distill.losses import topk_to_logits
from fastspec.distill.teacher import pad_left, pad_right, teacher_forced_logits
from fastspec.errors import UserError
from fastspec.files import atomic_write_text

MERGED_NAME = "pseudo.jsonl"


class PseudoDatasetError(UserError):
    """The output folder does not match this run, or a shard is corrupt."""


@dataclass(frozen=True)
class PseudoSettings:
    batch_size: int = 8
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    gamma: int = 5
    topk_logits: int = 0  # 0 = no logits cache

    def generation_kwargs(self, batch_index: int) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed + batch_index)
        return kwargs


@dataclass
class SourceRecord:
    """One training source: index is its position in the data set (0..N-1)."""

    index: int
    id: str
    source_ids: List[int]
    reference_ids: Optional[List[int]] = None


def _fingerprint(sources: Sequence[SourceRecord]) -> str:
    digest = hashlib.sha256()
    for rec in sources:
        digest.update(json.dumps([rec.index, rec.id, rec.source_ids]).encode())
    return digest.hexdigest()[:16]


def shard_paths(out_dir: str, rank: int, world_size: int):
    stem = os.path.join(out_dir, "shards", f"part-{rank:05d}-of-{world_size:05d}")
    return stem + ".jsonl", stem + ".cursor.json"


def strip_output(sequence: Sequence[int], eos_ids: Sequence[int], pad_id: int) -> List[int]:
    """Generated ids up to and including the first EOS; trailing padding dropped."""
    out = []
    for token in sequence:
        token = int(token)
        out.append(token)
        if token in eos_ids:
            return out
    while out and out[-1] == pad_id:
        out.pop()
    return out


def _read_json(path: str, damage: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise PseudoDatasetError(damage.format(path=path, err=err)) from None


def _check_meta(out_dir: str, meta: dict, is_main: bool) -> None:
    path = os.path.join(out_dir, "meta.json")
    if os.path.exists(path):
        existing = _read_json(path, "{path}: corrupt ({err}); delete the folder to start over")
        if existing != meta:
            changed = sorted(k for k in set(meta) | set(existing) if meta.get(k) != existing.get(k))
            raise PseudoDatasetError(
                f"{out_dir} holds a pseudo-dataset made with different {', '.join(changed)}; "
                "use another output folder to start a new one"
            )
    elif is_main:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True))


def _read_cursor(cursor_path: str, shard_path: str) -> dict:
    cursor = {"batches_done": 0, "records": 0, "bytes": 0}
    if os.path.exists(cursor_path):
        cursor = _read_json(cursor_path, "{path}: corrupt cursor ({err})")
    size = os.path.getsize(shard_path) if os.path.exists(shard_path) else 0
    if size < cursor["bytes"]:
        raise PseudoDatasetError(f"{shard_path}: shorter ({size} B) than its cursor says ({cursor['bytes']} B)")
    if size > cursor["bytes"]:  # lines of a batch that was never acknowledged: redo it
        with open(shard_path, "r+b") as handle:
            handle.truncate(cursor["bytes"])
    return cursor


def _save_topk_logits(path: str, model, batch: Sequence[SourceRecord], outputs: List[List[int]], k: int, device) -> None:
    from safetensors.torch import save_file

    with torch.no_grad():
        logits, mask = teacher_forced_logits(model, [r.source_ids for r in batch], outputs, device=device)  # [B,T,V]
    logits = logits.float()
    k = min(k, logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)  # [B,T,k]
    lse = logits.logsumexp(-1)  # [B,T]
    tensors = {}
    for row, rec in enumerate(batch):
        n = int(mask[row].sum())
        tensors[f"{rec.index}.values"] = values[row, :n].cpu().contiguous()
        tensors[f"{rec.index}.indices"] = indices[row, :n].to(torch.int32).cpu().contiguous()
        tensors[f"{rec.index}.logsumexp"] = lse[row, :n].cpu().contiguous()
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata={"k": str(k), "vocab_size": str(logits.shape[-1])})
    os.replace(tmp, path)


def generate_pseudo_dataset(
    target,
    sources: Sequence[SourceRecord],
    out_dir: str,
    settings: PseudoSettings = PseudoSettings(),
    *,
    drafter=None,
    dist_info: Optional[DistInfo] = None,
    target_name: str = "",
    generate_fn: Optional[Callable] = None,
    progress: bool = True,
    on_batch_done: Optional[Callable[[int], None]] = None,
) -> Optional[str]:
    """Generate (or resume) this rank's part; after a barrier rank 0 merges.

    Returns the merged file path on rank 0 (None on the others).
    ``generate_fn(target, drafter, input_ids=, attention_mask=, gamma=, **gen_kwargs)``
    defaults to :func:`fastspec.engine.generate`. ``on_batch_done(batch_index)`` runs after a
    batch is durable (tests use it to simulate a crash).
    """
    from tqdm.auto import tqdm

    info = dist_info or DistInfo(0, 1, 0, torch.device("cpu"))
    generate_fn = generate_fn or engine.generate
    model = introspect.hf_model(target)
    seq2seq = introspect.is_encoder_decoder(model)
    pad_id, eos_ids = introspect.pad_token_id(model), introspect.eos_token_ids(model)
    if [r.index for r in sources] != list(range(len(sources))):
        raise ValueError("sources must be indexed 0..N-1 in order")

    meta = {
        "format": 1,
        "target": target_name,
        "is_encoder_decoder": seq2seq,
        "num_records": len(sources),
        "sources_sha256": _fingerprint(sources),
        "world_size": info.world_size,
        "settings": asdict(settings),
    }
    if info.is_main:
        _check_meta(out_dir, meta, True)
    barrier()
    _check_meta(out_dir, meta, False)
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    if settings.topk_logits:
        os.makedirs(os.path.join(out_dir, "logits"), exist_ok=True)

    num_batches = (len(sources) + settings.batch_size - 1) // settings.batch_size
    my_batches = list(range(info.rank, num_batches, info.world_size))
    shard_path, cursor_path = shard_paths(out_dir, info.rank, info.world_size)
    cursor = _read_cursor(cursor_path, shard_path)
    bar = tqdm(
        total=len(my_batches), initial=cursor["batches_done"], desc=f"pseudo rank {info.rank}",
        position=info.rank, disable=not progress, leave=True,
    )
    with open(shard_path, "ab") as shard:
        for batch_index in my_batches[cursor["batches_done"] :]:
            batch = sources[batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size]
            gen_kwargs = settings.generation_kwargs(batch_index)
            pad = pad_right if seq2seq else pad_left
            input_ids, attention_mask = pad([r.source_ids for r in batch], pad_id, info.device)
            with torch.no_grad():
                out = generate_fn(
                    target, drafter, input_ids=input_ids, attention_mask=attention_mask, gamma=settings.gamma, **gen_kwargs
                )
            sequences = out.sequences.cpu()
            skip = 1 if seq2seq else input_ids.shape[1]
            outputs = [strip_output(row[skip:].tolist(), eos_ids, pad_id) for row in sequences]
            if settings.topk_logits:
                logits_path = os.path.join(out_dir, "logits", f"batch-{batch_index:06d}.safetensors")
                _save_topk_logits(logits_path, model, batch, outputs, settings.topk_logits, info.device)
            lines = []
            for rec, output in zip(batch, outputs):
                record = {
                    "index": rec.index,
                    "id": rec.id,
                    "source_ids": rec.source_ids,
                    "output_ids": output,
                    "reference_ids": rec.reference_ids,
                    "generation": gen_kwargs,
                }
                if settings.topk_logits:
                    record["logits_file"] = f"logits/batch-{batch_index:06d}.safetensors"
                lines.append(json.dumps(record, separators=(",", ":")) + "\n")
            shard.write("".join(lines).encode("utf-8"))
            shard.flush()
            os.fsync(shard.fileno())
            cursor = {
                "batches_done": cursor["batches_done"] + 1,
                "records": cursor["records"] + len(batch),
                "bytes": shard.tell(),
            }
            atomic_write_text(cursor_path, json.dumps(cursor))
            bar.update(1)
            if on_batch_done is not None:
                on_batch_done(batch_index)
    bar.close()
    barrier()
    if info.is_main:
        return merge_shards(out_dir)
    return None


def merge_shards(out_dir: str) -> str:
    """Sort every shard's records by index into ``pseudo.jsonl`` (atomic); check coverage."""
    with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    world_size, num_records = meta["world_size"], meta["num_records"]
    by_index: Dict[int, str] = {}
    for rank in range(world_size):
        shard_path, cursor_path = shard_paths(out_dir, rank, world_size)
        _read_cursor(cursor_path, shard_path)  # drops lines of an unacknowledged batch
        with open(shard_path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                try:
                    index = json.loads(line)["index"]
                except (json.JSONDecodeError, KeyError):
                    raise PseudoDatasetError(f"{shard_path}:{line_no}: corrupt record") from None
                if index in by_index:
                    raise PseudoDatasetError(f"{shard_path}:{line_no}: duplicate record {index}")
                by_index[index] = line
    missing = [i for i in range(num_records) if i not in by_index]
    if missing:
        raise PseudoDatasetError(f"{out_dir}: {len(missing)} records missing (first: {missing[:5]}); rerun to finish")
    merged = os.path.join(out_dir, MERGED_NAME)
    atomic_write_text(merged, "".join(by_index[i] for i in range(num_records)))
    return merged


def load_pseudo_dataset(path: str) -> List[dict]:
    """Records of a merged pseudo-dataset (``path``: the folder or its pseudo.jsonl)."""
    file = os.path.join(path, MERGED_NAME) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise PseudoDatasetError(f"{path}: no pseudo-dataset here (expected {MERGED_NAME}; did `fastspec pseudo` finish?)")
    records = []
    with open(file, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                valid = isinstance(record, dict) and isinstance(record.get("output_ids"), list) and isinstance(record.get("source_ids"), list)
            except json.JSONDecodeError:
                valid = False
            if not valid:
                raise PseudoDatasetError(f"{file}:{line_no}: corrupt pseudo-dataset record (need JSON with source_ids and output_ids)")
            records.append(record)
    return records


def load_topk_logits(pseudo_dir: str, record: dict, vocab_size: int) -> torch.Tensor:
    """Dense teacher logits [T,V] for one record from the top-k cache (see losses.topk_to_logits)."""
    return topk_to_logits(*load_topk_cache(pseudo_dir, record, vocab_size), vocab_size)


def load_topk_cache(pseudo_dir: str, record: dict, vocab_size: int):
    """One record's top-k cache: (values [T,k], indices [T,k], logsumexp [T]) of the target's logits."""
    from safetensors import safe_open

    if "logits_file" not in record:
        raise PseudoDatasetError("this pseudo-dataset has no logits cache (generate it with --topk_logits K)")
    path = os.path.join(pseudo_dir, record["logits_file"])
    key = str(record["index"])
    with safe_open(path, framework="pt") as handle:
        cached_vocab = int(handle.metadata()["vocab_size"])
        if cached_vocab != vocab_size:
            raise PseudoDatasetError(f"{path}: logits cache has vocab {cached_vocab}, the drafter has {vocab_size}")
        values = handle.get_tensor(f"{key}.values")
        indices = handle.get_tensor(f"{key}.indices")
        lse = handle.get_tensor(f"{key}.logsumexp")
    return values, indices, lse
