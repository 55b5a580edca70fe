"""Loading any saved drafter: :func:`load_drafter` is the one loader (CLI, eval, demo, scripts).

The folder format itself (``config.json`` + ``model.safetensors``, checksummed) is in
:mod:`fastspec.drafters.folder`; its functions are re-exported here.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Optional

import torch

from fastspec import introspect, precision
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
from fastspec.drafters import cnn, ensemble, feature, hf, layer_skip, lstm, neural, ngram, prompt_lookup
from fastspec.errors import UserError
from fastspec.precision import DRAFTER_DTYPES


def _drafter_classes() -> dict:
    """kind written in config.json -> the class whose ``load(folder)`` reads it."""
    return {
        "ngram": ngram.NgramDrafter,
        "prompt_lookup": prompt_lookup.PromptLookupDrafter,
        "cnn": cnn.CNNDrafter,
        "lstm": lstm.LSTMDrafter,
        "hf": hf.HFDrafter,
    }




def load_drafter(folder: str, target=None, dtype=None):
    """The drafter saved in ``folder``, whatever its kind.

    target: the target model the drafter will serve. Layer-skip drafters (alone or inside an
        ensemble) need it, since their weights are the target's; with it, a drafter whose
        vocabulary differs from the target's is refused here rather than at the first draft.
    dtype: None (default): the drafter follows the target's dtype. A checkpoint stored in another
        dtype (say fp32 weights for a bf16 target) is CAST to the target's dtype, with one note
        line on stderr saying so: drafters are small, the engine compares only token ids, so
        losslessness never depends on the drafter's precision, and one dtype per run keeps the
        drafter's matmuls on the same (fast or emulated) units as the target's. Without a target
        the checkpoint's dtype is kept. Otherwise "float32"/"bfloat16"/"float16" (or a torch
        dtype) cast the drafter to that dtype, and "int8" gives a dynamically quantized float32
        drafter (:func:`quantize_drafter`, CPU only). Layer-skip drafters are the target's own
        layers and are never cast (int8 quantizes a copy of the drafter's layers).
    Raises :class:`~fastspec.errors.UserError` for a missing, corrupt or mismatched folder and
    for a dtype outside :data:`DRAFTER_DTYPES`.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such drafter folder (missing checkpoint)")
    want = _drafter_dtype(dtype, target)
    kind = canonical_kind(read_config(folder)["kind"])
    needy = None if target is not None else needs_target(folder)
    if needy is not None:
        inside = "" if needy[0] == folder else f" (its member {needy[0]} is one)"
        raise UserError(f"{folder}: a {needy[1].replace('_', '-')} drafter needs its target{inside}: "
                        "load_drafter(folder, target=...)")
    if kind == "layer_skip":
        drafter = layer_skip.LayerSkipDrafter.load(folder, introspect.hf_model(target))
    elif kind == "ensemble":
        config, _ = load_folder(folder, "ensemble")
        members = [load_drafter(os.path.join(folder, sub), target, dtype) for sub in config.get("drafters", [])]
        drafter = ensemble.EnsembleDrafter.from_config(config, members, folder)
        want = None  # the members are cast or quantized already
    elif kind == "feature":
        drafter = feature.FeatureDrafter.load(folder, introspect.hf_model(target))
    elif kind == "prompt_lookup":  # a hybrid's fallback is loaded (cast, quantized) by this function
        drafter = prompt_lookup.PromptLookupDrafter.load(folder, target=target, dtype=dtype)
        want = None
    elif kind in _drafter_classes():
        drafter = _drafter_classes()[kind].load(folder)
    else:
        raise UserError(f"{folder!r}: unknown drafter kind {kind!r}")
    if target is not None:
        check_vocabulary(drafter, target, folder)
    if want == "int8":
        return quantize_drafter(drafter)
    weights = _float_weights(drafter)
    if want is not None and weights is not None:
        stored = introspect.model_dtype(weights)
        if stored != want:
            if dtype is None:
                print(f"fastspec: note: drafter {folder} is stored in {_name(stored)}, the target runs in "
                      f"{_name(want)}: cast the drafter to {_name(want)}", file=sys.stderr)
            weights.to(want)
    return drafter


TARGET_KINDS = ("layer_skip", "feature")  # drafters built on the target's own modules or features


def needs_target(folder: str) -> Optional[tuple]:
    """(sub-folder, kind) of the first drafter in ``folder`` (itself, an ensemble member or a hybrid's
    fallback, at any depth) that can only be loaded with its target; None when none needs it."""
    meta = read_config(folder)
    kind, config = canonical_kind(meta["kind"]), meta.get("config") or {}
    if kind in TARGET_KINDS:
        return folder, kind
    subs = list(config.get("drafters") or []) if kind == "ensemble" else []
    if kind == "prompt_lookup" and config.get("fallback"):
        subs.append(config["fallback"])
    for sub in subs:
        found = needs_target(os.path.join(folder, sub))
        if found is not None:
            return found
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _drafter_dtype(dtype, target):
    """The dtype a loaded drafter gets: "int8", a torch float dtype, or None (keep the checkpoint's)."""
    if dtype is None:
        return None if target is None else introspect.model_dtype(introspect.hf_model(target))
    if isinstance(dtype, str) and dtype.lower() in ("int8", "qint8"):
        return "int8"
    if isinstance(dtype, str) and dtype.lower() == "auto":
        raise UserError(f"drafter dtype 'auto': leave it unset to follow the target; accepted: {', '.join(DRAFTER_DTYPES)}")
    try:
        return precision.resolve_dtype(dtype, "cpu" if target is None else introspect.model_device(target))
    except UserError as err:
        raise UserError(f"drafter {err}; for drafters: {', '.join(DRAFTER_DTYPES)}") from None


def _float_weights(drafter) -> Optional[torch.nn.Module]:
    """The drafter's own float module (what a cast changes); None for drafters without weights and
    for layer-skip drafters (their weights are the target's)."""
    if isinstance(drafter, layer_skip.LayerSkipDrafter) or precision.is_quantized(getattr(drafter, "model", torch.nn.Module())):
        return None
    model = getattr(drafter, "model", None)
    return model if isinstance(model, torch.nn.Module) and any(True for _ in model.parameters()) else None


# --------------------------------------------------------------------------- int8 drafters


def quantize_drafter(drafter):
    """An int8 copy of ``drafter`` (torch.ao dynamic quantization through
    :func:`fastspec.precision.quantize_int8`, CPU only); ``drafter`` itself is untouched.

    The one place that knows which modules of each kind are quantized:

    * CNN: the vocabulary-wide head Linear (convolutions stay float32); LSTM: the head Linear and
      the LSTM. Their native runtime reads float weights, so the copy runs the Python twin;
    * feature drafter: its decoder layer's Linears and the head (fusion + input projection stay float32);
    * HFDrafter: every Linear of the drafter model (lm_head included);
    * LayerSkipDrafter: a float32 copy of only the drafter's first k layers, final norm and LM
      head is quantized; the target's own modules are never touched (nor quantized);
    * ensemble: each member; a prompt-lookup hybrid: its fallback; n-gram and prompt lookup alone have
      no weights and are returned as they are.

    The engine verifies every draft with the target, so outputs stay lossless whatever the drafter.
    """
    if isinstance(drafter, layer_skip.LayerSkipDrafter):
        return _quantize_layer_skip(drafter)
    if isinstance(drafter, hf.HFDrafter):
        out = hf.HFDrafter(precision.quantize_int8(drafter.model), generator=drafter.generator,
                         vocab_size=drafter.vocab_size)
    elif isinstance(drafter, neural.NeuralDrafter):
        model = copy.deepcopy(drafter.model).float()
        model.head = precision.quantize_int8(model.head)
        if isinstance(model, lstm.LSTMLM):
            model.lstm = precision.quantize_int8(model.lstm)
        out = type(drafter)(model, start_token_id=drafter.start_token_id, use_native=False)
    elif isinstance(drafter, feature.FeatureDrafter):
        embed = drafter.model._embed  # the target's embeddings: shared, never copied
        model = copy.deepcopy(drafter.model, {id(embed): embed}).float()
        model.layer = precision.quantize_int8(model.layer)
        model.head = precision.quantize_int8(model.head)
        out = feature.FeatureDrafter(model)
    elif isinstance(drafter, ensemble.EnsembleDrafter):
        out = copy.copy(drafter)
        out.drafters = [quantize_drafter(d) for d in drafter.drafters]
    elif isinstance(drafter, prompt_lookup.PromptLookupDrafter) and drafter.fallback is not None:
        out = copy.copy(drafter)  # the hybrid: its fallback is quantized, the lookup has no weights
        out.fallback = quantize_drafter(drafter.fallback)
    elif isinstance(drafter, (ngram.NgramDrafter, prompt_lookup.PromptLookupDrafter)):
        return drafter
    else:
        raise UserError(f"int8: fastspec does not know which modules of a {type(drafter).__name__} to quantize")
    out.quantized = True
    return out


def _to_float32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _float32_inputs(module, args, kwargs):
    """Forward pre-hook: the quantized layers of a layer-skip copy take float32 whatever the target's dtype."""
    return _to_float32(args), {k: _to_float32(v) for k, v in kwargs.items()}


def _quantize_layer_skip(drafter):
    """LayerSkipDrafter: quantize float32 copies of the first k layers + exit; the target is shared, untouched."""
    view = layer_skip.truncated_view(drafter.model, drafter.num_layers)  # a fresh shell: same modules
    layers = layer_skip.decoder_layers(view)
    for i, layer in enumerate(list(layers)):
        layers[i] = precision.quantize_int8(layer)
        layers[i].register_forward_pre_hook(_float32_inputs, with_kwargs=True)
    (norm_owner, norm_name), (head_owner, head_name) = layer_skip.exit_modules(view)
    setattr(norm_owner, norm_name, copy.deepcopy(getattr(norm_owner, norm_name)).float())
    setattr(head_owner, head_name, precision.quantize_int8(getattr(head_owner, head_name)))
    out = layer_skip.LayerSkipDrafter(None, drafter.num_layers, view=view, generator=drafter.generator,
                                      vocab_size=drafter.vocab_size)
    out.quantized = True
    return out


def check_vocabulary(drafter, target, where: Optional[str] = None) -> None:
    """A drafter must score the target's tokens: same vocabulary size (None adapts to any)."""
    theirs, ours = getattr(drafter, "vocab_size", None), introspect.vocab_size(introspect.hf_model(target))
    if theirs is not None and int(theirs) != ours:
        raise UserError(f"{where or type(drafter).__name__}: wrong vocab: the drafter has {theirs} tokens, the target {ours}")


__all__ = ["load_drafter", "needs_target", "quantize_drafter", "DRAFTER_DTYPES", "check_vocabulary", "save_folder", "load_folder", "read_config", "update_config",
           "file_sha256"]
