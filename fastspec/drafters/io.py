"""Loading any saved drafter: :func:`load_drafter` is the one loader (CLI, eval, demo, scripts).

The folder format itself (``config.json`` + ``model.safetensors``, checksummed) is in
:mod:`fastspec.drafters.folder`; its functions are re-exported here.
"""
from __future__ import annotations

import os
from typing import Optional

from fastspec import introspect
from fastspec.drafters.folder import (  # noqa: F401  (re-exported: the drafter folder format)
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    canonical_kind,
    file_sha256,
    load_folder,
    read_config,
    save_folder,
    update_config,
)
# modules, not classes: prompt_lookup imports this module while it is itself being imported
from fastspec.drafters import cnn, ensemble, hf, layer_skip, lstm, ngram, prompt_lookup
from fastspec.errors import UserError


def _drafter_classes() -> dict:
    """kind written in config.json -> the class whose ``load(folder)`` reads it."""
    return {
        "ngram": ngram.NgramDrafter,
        "prompt_lookup": prompt_lookup.PromptLookupDrafter,
        "cnn": cnn.CNNDrafter,
        "lstm": lstm.LSTMDrafter,
        "hf": hf.HFDrafter,
    }


def load_drafter(folder: str, target=None):
    """The drafter saved in ``folder``, whatever its kind.

    target: the target model the drafter will serve. Layer-skip drafters (alone or inside an
        ensemble) need it, since their weights are the target's; with it, a drafter whose
        vocabulary differs from the target's is refused here rather than at the first draft.
    Raises :class:`~fastspec.errors.UserError` for a missing, corrupt or mismatched folder.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such drafter folder (missing checkpoint)")
    kind = canonical_kind(read_config(folder)["kind"])
    if kind == "layer_skip":
        if target is None:
            raise UserError(f"{folder}: a layer-skip drafter needs its target (load_drafter(folder, target=...))")
        drafter = layer_skip.LayerSkipDrafter.load(folder, introspect.hf_model(target))
    elif kind == "ensemble":
        config, _ = load_folder(folder, "ensemble")
        members = [load_drafter(os.path.join(folder, sub), target) for sub in config.get("drafters", [])]
        drafter = ensemble.EnsembleDrafter.from_config(config, members, folder)
    elif kind in _drafter_classes():
        drafter = _drafter_classes()[kind].load(folder)
    else:
        raise UserError(f"{folder!r}: unknown drafter kind {kind!r}")
    if target is not None:
        check_vocabulary(drafter, target, folder)
    return drafter


def check_vocabulary(drafter, target, where: Optional[str] = None) -> None:
    """A drafter must score the target's tokens: same vocabulary size (None adapts to any)."""
    theirs, ours = getattr(drafter, "vocab_size", None), introspect.vocab_size(introspect.hf_model(target))
    if theirs is not None and int(theirs) != ours:
        raise UserError(f"{where or type(drafter).__name__}: wrong vocab: the drafter has {theirs} tokens, the target {ours}")


__all__ = ["load_drafter", "check_vocabulary", "save_folder", "load_folder", "read_config", "update_config",
           "file_sha256"]
