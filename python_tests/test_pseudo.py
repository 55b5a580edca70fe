"""Pseudo-dataset generation: records, resume after a crash, rank sharding, logits cache."""
import json
import os

import pytest
import torch

from distill_helpers import hf_generate, tiny_llama, tiny_t5
from fastspec.distill.distributed import DistInfo
from fastspec.distill.pseudo import (
    PseudoDatasetError,
    PseudoSettings,
    SourceRecord,
    generate_pseudo_dataset,
    load_pseudo_dataset,
    load_topk_logits,
    merge_shards,
    shard_paths,
)
from fastspec.distill.teacher import teacher_forced_logits


def _sources(n=7, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist() + [1]
        out.append(SourceRecord(index=i, id=f"doc{i}", source_ids=ids, reference_ids=[5, 6, 1]))
    return out


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(vocab_size=128, seed=0)


SETTINGS = PseudoSettings(batch_size=2, max_new_tokens=6)


def _run(model, sources, out, settings=SETTINGS, **kw):
    return generate_pseudo_dataset(model, sources, str(out), settings, generate_fn=hf_generate, progress=False, **kw)


def test_records_are_the_targets_greedy_outputs(t5, tmp_path):
    sources = _sources()
    merged = _run(t5, sources, tmp_path)
    records = load_pseudo_dataset(str(tmp_path))
    assert [r["index"] for r in records] == list(range(7))
    for rec, src in zip(records, sources):
        expected = t5.generate(torch.tensor([src.source_ids]), max_new_tokens=6, do_sample=False)[0, 1:].tolist()
        if 1 in expected:
            expected = expected[: expected.index(1) + 1]
        assert rec["output_ids"] == expected and rec["source_ids"] == src.source_ids and rec["id"] == src.id
        assert rec["reference_ids"] == [5, 6, 1] and rec["generation"] == {"max_new_tokens": 6, "do_sample": False}
    assert merged == os.path.join(str(tmp_path), "pseudo.jsonl")


class Crash(RuntimeError):
    pass


def test_resume_after_crash_no_duplicates_no_loss(t5, tmp_path):
    sources = _sources(9)
    reference_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    _run(t5, sources, reference_dir)

    def crash_after(batch_index):
        if batch_index == 1:
            raise Crash()

    with pytest.raises(Crash):
        _run(t5, sources, crash_dir, on_batch_done=crash_after)
    shard, cursor = shard_paths(str(crash_dir), 0, 1)
    assert json.load(open(cursor))["batches_done"] == 2
    # a crash in the middle of the next batch's write leaves a torn, unacknowledged line
    with open(shard, "a") as handle:
        handle.write('{"index": 4, "id": "doc4", "source_')
    with pytest.raises(PseudoDatasetError, match="missing"):
        merge_shards(str(crash_dir))
    _run(t5, sources, crash_dir)
    assert (crash_dir / "pseudo.jsonl").read_bytes() == (reference_dir / "pseudo.jsonl").read_bytes()
    indices = [json.loads(line)["index"] for line in open(shard)]
    assert sorted(indices) == list(range(9)) and len(set(indices)) == 9


def test_two_ranks_write_disjoint_shards_and_merge_identically(t5, tmp_path):
    sources = _sources(9)
    settings = PseudoSettings(batch_size=2, max_new_tokens=6, do_sample=True, top_k=20, seed=11)
    _run(t5, sources, tmp_path / "one", settings)
    for rank in (1, 0):  # barrier() is a no-op without a process group; rank 0 merges last
        _run(t5, sources, tmp_path / "two", settings, dist_info=DistInfo(rank, 2, 0, torch.device("cpu")))
    per_rank = [[json.loads(l)["index"] for l in open(shard_paths(str(tmp_path / "two"), r, 2)[0])] for r in (0, 1)]
    assert per_rank == [[0, 1, 4, 5, 8], [2, 3, 6, 7]]
    assert (tmp_path / "two" / "pseudo.jsonl").read_bytes() == (tmp_path / "one" / "pseudo.jsonl").read_bytes()
    seeds = [r["generation"]["seed"] for r in load_pseudo_dataset(str(tmp_path / "one"))]
    assert seeds == [11, 11, 12, 12, 13, 13, 14, 14, 15]


def test_mismatched_resume_is_refused(t5, tmp_path):
    _run(t5, _sources(3), tmp_path)
    with pytest.raises(PseudoDatasetError, match="different .*settings"):
        _run(t5, _sources(3), tmp_path, PseudoSettings(batch_size=2, max_new_tokens=7))
    with pytest.raises(PseudoDatasetError, match="no pseudo-dataset"):
        load_pseudo_dataset(str(tmp_path / "missing"))


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_topk_logits_cache(kind, t5, tmp_path):
    model = t5 if kind == "t5" else tiny_llama(vocab_size=128)
    sources = _sources(4)
    _run(model, sources, tmp_path, PseudoSettings(batch_size=3, max_new_tokens=5, topk_logits=8))
    records = load_pseudo_dataset(str(tmp_path))
    for rec in records:
        dense = load_topk_logits(str(tmp_path), rec, 128)  # [T,V] log-probs
        with torch.no_grad():
            logits, mask = teacher_forced_logits(model, [rec["source_ids"]], [rec["output_ids"]])
        exact = logits[0].log_softmax(-1)
        top = exact.topk(8, -1).indices
        assert dense.shape == (len(rec["output_ids"]), 128)
        assert torch.allclose(dense.gather(1, top), exact.gather(1, top), atol=1e-5)
        # greedy outputs are the argmax of the teacher-forced logits
        assert dense.argmax(-1).tolist() == rec["output_ids"]
    with pytest.raises(PseudoDatasetError, match="vocab 128"):
        load_topk_logits(str(tmp_path), records[0], 100)
