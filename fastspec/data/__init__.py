"""Data: CNN/DailyMail local copies, aclsum, prompts and batched tokenization."""
from __future__ import annotations

import os
from typing import List, Optional

from fastspec.data.aclsum import ASPECTS, SECTIONS, aclsum_dir, load_aclsum, load_aclsum_papers
from fastspec.data.cnndm import load_cnndm, parse_story
from fastspec.data.example import DataError, Example
from fastspec.data.prompts import (
    EncodedSources,
    default_max_source_length,
    encode_prompts,
    encode_references,
    encode_sources,
    format_prompts,
    prompt_template,
)

__all__ = [
    "DataError", "Example", "EncodedSources", "load_examples", "load_cnndm", "parse_story", "load_aclsum",
    "load_aclsum_papers", "aclsum_dir", "ASPECTS", "SECTIONS", "encode_sources", "encode_prompts", "encode_references",
    "format_prompts", "prompt_template", "default_max_source_length",
]


def load_examples(spec: str, split: str = "train", limit: Optional[int] = None) -> List[Example]:
    """One entry point for the CLI.

    ``spec``: ``aclsum`` (abstract -> all aspects), ``aclsum:<section>`` or
    ``aclsum:<section>:<aspect>[+<aspect>...]``, ``aclsum_papers`` (the unlabeled full papers of
    ``split``'s examples; ``split="all"``: all 250), or a path
    to a CNN/DailyMail copy (see :func:`load_cnndm`).
    """
    if spec.startswith("aclsum_papers"):
        return load_aclsum_papers(split=None if split == "all" else split, limit=limit)
    if spec == "aclsum" or spec.startswith("aclsum:"):
        parts = spec.split(":")[1:]
        source = parts[0] if parts and parts[0] else "abstract"
        aspects = tuple(parts[1].split("+")) if len(parts) > 1 else ASPECTS
        return load_aclsum(split, source=source, aspects=aspects, limit=limit)
    if os.path.exists(spec):
        return load_cnndm(spec, split=split, limit=limit)
    if os.sep in spec or spec.endswith((".jsonl", ".json", ".csv")):
        raise DataError(f"{spec}: no such file or folder")
    raise DataError(f"{spec}: not a dataset (use 'aclsum', 'aclsum:<section>[:<aspects>]', 'aclsum_papers' or a path)")
