"""Atomic training checkpoints without pickle.

A checkpoint is one folder ``step-NNNNNNNN`` holding

* ``model.safetensors``      the trainable weights (student state dict);
* ``optimizer.safetensors``  every tensor of ``optimizer.state_dict()["state"]``, keyed
  ``state.<param index>.<name>``; the non-tensor parts (param_groups, python scalars such
  as Adafactor's integer step) go into the file's JSON metadata. This replaces
  ``torch.save`` (pickle) and round-trips the state exactly;
* ``trainer_state.json``     step, scheduler state, the training config.

It is written into a temporary sibling folder and moved into place with ``os.replace``,
then ``latest`` (a one-line text file) is replaced atomically: a crash at any point leaves
either the previous or the new checkpoint, never a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from fastspec.errors import UserError
from fastspec.files import atomic_write_text

LATEST = "latest"


class CheckpointError(UserError):
    """A missing or corrupt checkpoint."""


def flatten_optimizer_state(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], str]:
    """optimizer.state_dict() -> (tensors, json metadata)."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, dict] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars, "param_ids": [str(k) for k in state_dict["state"]]}
    return tensors, json.dumps(meta)


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta_json: str) -> dict:
    meta = json.loads(meta_json)
    state: Dict[int, dict] = {int(k): {} for k in meta["param_ids"]}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    # JSON turned tuples (betas, Adafactor's eps) into lists; "params" is the only real list
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    ckpt_root: str,
    step: int,
    model_state: Dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` ones. Returns its folder."""
    from safetensors.torch import save_file

    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".{name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}, os.path.join(tmp, "model.safetensors"))
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"), metadata={"optimizer": opt_meta})
    with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump(trainer_state, handle, indent=1, sort_keys=True)
    for file in os.listdir(tmp):
        with open(os.path.join(tmp, file), "rb") as handle:
            os.fsync(handle.fileno())
    if os.path.exists(final):  # a re-run of the same step: replace the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(ckpt_root, LATEST), name + "\n")
    existing = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-"))
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        folder = os.path.join(ckpt_root, handle.read().strip())
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} points at {folder}, which does not exist")
    return folder


def load_checkpoint(folder: str) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """-> (model_state, optimizer_state_dict, trainer_state)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        model_state = load_file(os.path.join(folder, "model.safetensors"))
        with safe_open(os.path.join(folder, "optimizer.safetensors"), framework="pt") as handle:
            opt_meta = handle.metadata()["optimizer"]
            opt_tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
            trainer_state = json.load(handle)
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{folder}: corrupt or incomplete checkpoint ({err})") from None
    return model_state, unflatten_optimizer_state(opt_tensors, opt_meta), trainer_state
