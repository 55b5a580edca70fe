"""aclsum (PyPI ``aclsum==0.1.2``, MIT): the bundled real summarization data.

Task: the ``source`` section of a paper (abstract, introduction or conclusion) -> the
summary sentence(s) of the chosen aspects (challenge, approach, outcome), joined by a
space in that order. The 250 full papers under ``paper_jsons/`` are unlabeled text.

aclsum's sentences are stored tokenized ("Machine Translation ( MT ) systems ."); by default
they are detokenized with the Moses detokenizer (sacremoses), because a target writes
"(MT) systems." and prompt lookup can only copy what the source spells the same way.
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
from typing import List, Optional, Sequence

from fastspec.data.example import DataError, Example


def _detokenize(sentences: Sequence[str]) -> str:
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang="en")
    return " ".join(detok.detokenize(sentence.split()) for sentence in sentences)

SECTIONS = ("abstract", "introduction", "conclusion")
ASPECTS = ("challenge", "approach", "outcome")
SPLITS = ("train", "val", "test")


def aclsum_dir() -> str:
    """The installed package's ``dataset`` folder."""
    try:
        root = importlib.metadata.distribution("aclsum").locate_file("aclsum")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("aclsum is not installed: `pip install --no-deps aclsum==0.1.2`") from None
    return os.path.join(str(root), "dataset")


def load_aclsum(
    split: str = "train",
    source: str = "abstract",
    aspects: Sequence[str] = ASPECTS,
    limit: Optional[int] = None,
    detokenize: bool = True,
) -> List[Example]:
    """Labeled aclsum examples. ``split`` in train/val/test (``validation`` means val)."""
    split = {"validation": "val", "dev": "val"}.get(split, split)
    if split not in SPLITS:
        raise DataError(f"aclsum has splits {SPLITS}, not {split!r}")
    if source not in SECTIONS:
        raise DataError(f"aclsum source must be one of {SECTIONS}, not {source!r}")
    bad = [a for a in aspects if a not in ASPECTS]
    if bad or not aspects:
        raise DataError(f"aclsum aspects must be a non-empty subset of {ASPECTS}, got {list(aspects)}")
    examples = []
    with open(os.path.join(aclsum_dir(), f"{split}.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            examples.append(
                Example(
                    id=row["id"],
                    source=_detokenize(row["sentences"][source]) if detokenize else " ".join(row["sentences"][source]),
                    reference=" ".join(row["summary"][a] for a in aspects),
                )
            )
            if limit is not None and len(examples) >= limit:
                break
    return examples


def load_aclsum_papers(split: Optional[str] = None, limit: Optional[int] = None,
                       ids: Optional[Sequence[str]] = None) -> List[Example]:
    """The full papers as unlabeled text (abstract + body paragraphs), sorted by file name.

    ``split`` (train/val/test) keeps the papers of that split's labeled examples only, ``ids`` those
    papers only; neither = all 250. A paper's text holds its abstract and summary sentences, so
    training on all of them and testing on aclsum test would test on training text."""
    keep = None if ids is None else set(ids)
    if split is not None:
        split_ids = {e.id for e in load_aclsum(split, detokenize=False)}
        keep = split_ids if keep is None else keep & split_ids
    examples = []
    for file in sorted(glob.glob(os.path.join(aclsum_dir(), "paper_jsons", "*.json"))):
        paper_id = os.path.splitext(os.path.basename(file))[0]
        if keep is not None and paper_id not in keep:
            continue
        with open(file, encoding="utf-8") as handle:
            paper = json.load(handle)
        parse = paper.get("pdf_parse") or {}
        paragraphs = [p["text"] for p in parse.get("abstract", []) + parse.get("body_text", []) if p.get("text")]
        if not paragraphs and paper.get("abstract"):
            paragraphs = [paper["abstract"]]
        examples.append(Example(id=paper_id, source="\n".join(paragraphs)))
        if limit is not None and len(examples) >= limit:
            break
    return examples
