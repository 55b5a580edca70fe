"""The drafter folder format: ``config.json`` + ``model.safetensors``, no pickle.

Every drafter saves and loads through :func:`save_folder` / :func:`load_folder`. The config
records the drafter kind, a format version and the SHA-256 of every file, so a truncated or
edited checkpoint fails with a clear :class:`~fastspec.errors.UserError` instead of loading
garbage. Loading a folder as a drafter is :func:`fastspec.drafters.io.load_drafter`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import torch

from fastspec.errors import UserError
from fastspec.files import atomic_write_text

FORMAT_NAME = "fastspec-drafter"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# kinds written by older releases -> the one name used now
KIND_ALIASES = {"layerskip": "layer_skip"}


def canonical_kind(kind: str) -> str:
    return KIND_ALIASES.get(kind, kind)


def file_sha256(path: str) -> str:
    """SHA-256 of a file, for ``save_folder(extra_files=...)``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON of everything in config.json but this digest."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_config(folder: str, meta: dict) -> None:
    meta["config_sha256"] = config_digest(meta)
    atomic_write_text(os.path.join(folder, CONFIG_FILE), json.dumps(meta, indent=2, sort_keys=True))


def save_folder(
    folder: str,
    kind: str,
    config: dict,
    tensors: Optional[Dict[str, torch.Tensor]] = None,
    extra_files: Optional[Dict[str, str]] = None,
) -> None:
    """Write ``config.json`` (+ ``model.safetensors`` when ``tensors`` is given).

    extra_files: {name in folder: sha256} of files the drafter wrote itself (e.g. the
        n-gram table's own binary), checked on load like the weights.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "config": config, "files": {}}
    if tensors is not None:
        path = os.path.join(folder, WEIGHTS_FILE)
        # safetensors refuses shared/non-contiguous storage: store independent copies.
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, path)
        meta["files"][WEIGHTS_FILE] = file_sha256(path)
    for name, digest in (extra_files or {}).items():
        meta["files"][name] = digest
    _write_config(folder, meta)


def update_config(folder: str, key: str, value) -> None:
    """Set ``config[key]`` in a saved drafter's config.json (e.g. how it was trained) and re-seal it."""
    meta = read_config(folder)
    meta["config"][key] = value
    _write_config(folder, meta)


def read_config(folder: str) -> dict:
    """The parsed and checked ``config.json`` of a drafter folder (no weights read)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{folder!r} is not a fastspec drafter folder: {CONFIG_FILE} is missing")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupted drafter config {path!r}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path!r} is not a fastspec drafter config (format field missing or wrong)")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path!r} has drafter format version {meta.get('version')!r}; this fastspec reads {FORMAT_VERSION}")
    for key in ("kind", "config", "files", "config_sha256"):
        if key not in meta:
            raise UserError(f"corrupted drafter config {path!r}: field {key!r} missing")
    if meta["config_sha256"] != config_digest(meta):
        raise UserError(f"corrupted drafter config {path!r}: its checksum does not match its content")
    return meta


def load_folder(folder: str, kind: Optional[str] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Read a drafter folder: returns (config, tensors); tensors is {} when none were saved.

    Raises UserError for a missing/corrupted file, a checksum mismatch or a wrong ``kind``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_config(folder)
    if kind is not None and canonical_kind(meta["kind"]) != canonical_kind(kind):
        raise UserError(f"{folder!r} holds a {meta['kind']!r} drafter, not a {kind!r} one")
    for name, digest in meta["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"drafter folder {folder!r} is incomplete: {name} is missing")
        if file_sha256(path) != digest:
            raise UserError(f"corrupted drafter file {path!r}: checksum does not match config.json")
    tensors: Dict[str, torch.Tensor] = {}
    if WEIGHTS_FILE in meta["files"]:
        try:
            tensors = load_file(os.path.join(folder, WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise UserError(f"corrupted drafter weights in {folder!r}: {e}") from None
    return meta["config"], tensors
