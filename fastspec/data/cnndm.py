"""CNN/DailyMail loaders for local copies (no network).

Three on-disk forms are understood, each yielding :class:`~fastspec.data.Example`
records (``source`` = article, ``reference`` = highlights):

* a HF ``datasets`` folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* JSONL or CSV files with ``article`` and ``highlights`` columns (``id`` optional);
* the original ``.story`` folders (``cnn/stories``, ``dailymail/stories`` or any folder of
  ``*.story`` files), parsed like HF's ``cnn_dailymail`` 3.0.0 builder.

A folder may also hold one file/folder per split: ``train.jsonl``, ``validation.csv``,
``test/`` (stories) ...; ``split`` picks it.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Iterator, List, Optional

from fastspec.data.example import DataError, Example

# Sentence-final tokens of the HF cnn_dailymail builder (lines without one get " .").
_END_TOKENS = {".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")"}
_SPLIT_ALIASES = {"val": "validation", "validation": "val", "dev": "validation"}


def load_cnndm(path: str, split: str = "train", limit: Optional[int] = None) -> List[Example]:
    """Load CNN/DailyMail examples from ``path`` (see the module docstring for the formats)."""
    resolved = _resolve_split(path, split)
    if _is_hf_datasets_dir(resolved):
        examples = _load_hf_disk(resolved, split)
    elif os.path.isdir(resolved):
        examples = _load_story_dir(resolved, limit)
    elif resolved.endswith((".jsonl", ".json")):
        examples = _load_jsonl(resolved)
    elif resolved.endswith(".csv"):
        examples = _load_csv(resolved)
    else:
        raise DataError(f"{path}: not a CNN/DailyMail copy (expected a datasets folder, .jsonl, .csv or .story folder)")
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"{resolved}: no examples found")
    return examples


def _resolve_split(path: str, split: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if not os.path.isdir(path) or _is_hf_datasets_dir(path):
        return path
    names = [split] + ([_SPLIT_ALIASES[split]] if split in _SPLIT_ALIASES else [])
    for name in names:
        for candidate in (f"{name}.jsonl", f"{name}.json", f"{name}.csv", name):
            full = os.path.join(path, candidate)
            if os.path.exists(full):
                return full
    return path


def _is_hf_datasets_dir(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json"))
    )


def _row_to_example(row: dict, index: int, where: str) -> Example:
    try:
        article, highlights = row["article"], row["highlights"]
    except KeyError as missing:
        raise DataError(f"{where}: record {index} has no {missing} field (need 'article' and 'highlights')") from None
    return Example(id=str(row.get("id") or index), source=article, reference=highlights)


def _load_hf_disk(path: str, split: str) -> List[Example]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a HF datasets folder needs `pip install datasets`") from None
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = [split] + ([_SPLIT_ALIASES[split]] if split in _SPLIT_ALIASES else [])
        found = [n for n in names if n in loaded]
        if not found:
            raise DataError(f"{path}: no split {split!r} (have {sorted(loaded)})")
        loaded = loaded[found[0]]
    return [_row_to_example(row, i, path) for i, row in enumerate(loaded)]


def _load_jsonl(path: str) -> List[Example]:
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            examples.append(_row_to_example(row, len(examples), f"{path}:{line_no}"))
    return examples


def _load_csv(path: str) -> List[Example]:
    with open(path, encoding="utf-8", newline="") as handle:
        return [_row_to_example(row, i, path) for i, row in enumerate(csv.DictReader(handle))]


def _story_files(path: str) -> Iterator[str]:
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if name.endswith(".story"):
                yield os.path.join(root, name)


def _load_story_dir(path: str, limit: Optional[int]) -> List[Example]:
    examples = []
    for file in _story_files(path):
        with open(file, encoding="utf-8") as handle:
            article, highlights = parse_story(handle.read())
        examples.append(Example(id=os.path.splitext(os.path.basename(file))[0], source=article, reference=highlights))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _fix_missing_period(line: str) -> str:
    if "@highlight" in line or line == "" or line[-1] in _END_TOKENS:
        return line
    return line + " ."


def parse_story(text: str):
    """Split a ``.story`` file into (article, highlights) like HF's cnn_dailymail 3.0.0:
    article lines joined by spaces, highlights (the lines after ``@highlight``) by newlines."""
    lines = [_fix_missing_period(line.strip()) for line in text.splitlines()]
    article, highlights, next_is_highlight = [], [], False
    for line in lines:
        if not line:
            continue
        if line.startswith("@highlight"):
            next_is_highlight = True
        elif next_is_highlight:
            highlights.append(line)
        else:
            article.append(line)
    return " ".join(article), "\n".join(highlights)
