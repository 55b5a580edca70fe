"""Precision: which dtype to run in, int8 drafters, and how to tell low-precision numerics from a bug.

In bf16/fp16 a (γ+1)-token forward is not bit-identical to a 1-token forward, so greedy outputs
may part from autoregressive decoding at a near-tie. fp32 stays the exactness reference; in low
precision we report agreement and check that each divergence is a near-tie.
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from fastspec.errors import UserError
from fastspec.skinny_linear import to_plain

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DRAFTER_DTYPES = ("float32", "bfloat16", "float16", "int8")  # load_drafter(dtype=...), --drafter_dtype
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# A near-tie: the two diverging tokens are the target's top two and their logits differ by at most this.
# bf16 keeps 8 mantissa bits: a logit near 20 is rounded to ±0.06, and 6-token vs 1-token forwards
# accumulate in different orders over 30 layers, so gaps up to ~0.5 flip (DESIGN §8 saw ≤ 0.5).
NEAR_TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}

_announced = set()


def cpu_capabilities() -> dict:
    getter = getattr(torch.cpu, "get_capabilities", None)
    return dict(getter()) if getter is not None else {}


def cpu_has_bf16_units() -> bool:
    caps = cpu_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def cpu_has_fp16_units() -> bool:
    caps = cpu_capabilities()
    return bool(caps.get("amx_fp16") or caps.get("avx512_fp16"))


def auto_dtype(device: Union[str, torch.device, None] = None) -> Tuple[torch.dtype, str]:
    """(dtype, why): bf16 on CUDA (fp16 where bf16 is unsupported); on a CPU bf16 when it has bf16
    matrix units (AMX or AVX512-BF16), else fp32."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA supports bf16"
        return torch.float16, "this GPU has no bf16: fp16"
    if device.type == "cpu":
        caps = cpu_capabilities()
        units = [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]
        if units:
            return torch.bfloat16, f"the CPU has {'/'.join(units)}"
        return torch.float32, "the CPU has no bf16 matrix units (no amx_bf16/avx512_bf16): fell back to fp32"
    return torch.float32, f"no automatic low precision on {device.type}"


def resolve_dtype(dtype, device: Union[str, torch.device, None] = None, announce: bool = False) -> Optional[torch.dtype]:
    """A torch dtype from a dtype or a name ("auto", "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16").

    None stays None (keep the checkpoint's dtype). ``announce`` prints the choice once per process
    in one line. Raises UserError for unknown names and for fp16 on a CPU without fp16 units.
    """
    if dtype is None:
        return None
    device = torch.device(device or "cpu")
    if isinstance(dtype, torch.dtype):
        resolved, why = dtype, "asked for"
    else:
        name = str(dtype).replace("torch.", "").lower()
        name = _ALIASES.get(name, name)
        if name not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPE_NAMES)}")
        if name == "auto":
            resolved, why = auto_dtype(device)
        else:
            resolved, why = getattr(torch, name), "asked for"
    if resolved not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise UserError(f"dtype {resolved} is not a float dtype; accepted: {', '.join(DTYPE_NAMES)}")
    if resolved == torch.float16 and device.type == "cpu" and not cpu_has_fp16_units():
        raise UserError("dtype float16 on this CPU: it has no fp16 units (avx512_fp16/amx_fp16); "
                        "accepted here: auto, float32, bfloat16")
    if announce and (str(dtype), device.type) not in _announced:
        _announced.add((str(dtype), device.type))
        print(f"fastspec: dtype {dtype} -> {str(resolved).replace('torch.', '')} on {device.type} ({why})",
              file=sys.stderr)
    return resolved


# ------------------------------------------------------------------------------- int8 drafters


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """int8 weight, dynamic int8 activation copy of ``module``'s Linear (and LSTM) layers, for CPU.

    ``module`` itself is left as it was (a float32 deep copy is quantized); a bare Linear or LSTM
    is quantized too. The copy takes float32 inputs.

    Uses ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86 kernels). Its successor, torchao's
    ``Int8WeightOnlyConfig``, was 2-5x *slower* than fp32 in eager mode on this CPU (it relies on
    torch.compile), while quantize_dynamic was 5-13x faster on a drafter's vocabulary-wide head,
    so we keep the ao path (deprecated in torch 2.13, still shipped) behind this one function.
    """
    if any(p.device.type != "cpu" for p in module.parameters()):
        raise UserError("int8 drafters run on the CPU only (torch.ao dynamic quantization)")
    wrapped = torch.nn.Sequential(copy.deepcopy(module).float())  # quantize_dynamic swaps children only
    to_plain(wrapped.modules())  # it quantizes exact nn.Linear types only (fastspec's drafters use SkinnyLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices would print on every call site
        torch.ao.quantization.quantize_dynamic(wrapped, {torch.nn.Linear, torch.nn.LSTM}, dtype=torch.qint8,
                                               inplace=True)
    return wrapped[0]


def is_quantized(module: torch.nn.Module) -> bool:
    """True when ``module`` is (or holds) a torch.ao dynamically quantized layer."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())


# ------------------------------------------------------------------------------- agreement


@dataclass
class Divergence:
    """Where a decoded output first parts from the reference (autoregressive) output."""

    position: int  # index into the new tokens
    reference_token: int
    other_token: int  # -1: the other output ended here
    gap: Optional[float] = None  # target logit of the top token minus the runner-up, at ``position``
    near_tie: Optional[bool] = None


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> Optional[int]:
    """First index where two token lists differ (a shorter list differs where it ends); None if equal."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if int(a) != int(b):
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> Tuple[int, int]:
    """(agreeing, compared): tokens of ``reference`` reproduced before the first divergence, of all of them.
    After a divergence the two outputs are offset, so later positions are not compared."""
    at = first_divergence(reference, other)
    return (len(reference) if at is None else at), len(reference)


@torch.no_grad()
def position_logits(target, new_tokens: Sequence[int], position: int, *, input_ids=None, attention_mask=None,
                    decoder_start_token_id: Optional[int] = None, **encoder_inputs) -> torch.Tensor:
    """The target's logits [V] (float32) for new token ``position``, teacher-forced on new_tokens[:position].

    input_ids [1,S]: the prompt (causal) or the encoder input (seq2seq, or any ``encoder_inputs``).
    """
    device = next(target.parameters()).device
    prefix = torch.tensor([list(new_tokens[:position])], dtype=torch.long, device=device)
    if target.config.is_encoder_decoder:
        start = torch.tensor([[decoder_start_token_id]], dtype=torch.long, device=device)
        kwargs = {k: v.to(device) for k, v in encoder_inputs.items()}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids.to(device)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        logits = target(decoder_input_ids=torch.cat([start, prefix], 1), **kwargs).logits
    else:
        ids = torch.cat([input_ids.to(device), prefix], 1)
        mask = None if attention_mask is None else torch.cat([attention_mask.to(device), torch.ones_like(prefix)], 1)
        logits = target(input_ids=ids, attention_mask=mask).logits
    return logits[0, -1].float()


def classify_divergence(logits: torch.Tensor, reference_token: int, other_token: int, tolerance: float) -> Tuple[float, bool]:
    """(gap, near_tie) at a divergence, from the target's logits [V] there. gap = the top logit minus
    the lower of the two diverging tokens' logits; a near-tie when gap ≤ ``tolerance``, i.e. both
    tokens are (within rounding) the target's best. With two clear leaders this is the top-2 gap."""
    if other_token < 0:
        return float("inf"), False
    top = float(logits.max())
    gap = top - min(float(logits[int(reference_token)]), float(logits[int(other_token)]))
    return gap, gap <= tolerance


def check_divergence(target, reference: Sequence[int], other: Sequence[int], *, tolerance: Optional[float] = None,
                     **inputs) -> Optional[Divergence]:
    """None when ``other`` equals ``reference``; else the first divergence, classified with the target's
    logits there (``inputs``: as for :func:`position_logits`). The default tolerance follows the
    target's dtype (:data:`NEAR_TIE_TOLERANCE`)."""
    at = first_divergence(reference, other)
    if at is None:
        return None
    ref_token = int(reference[at]) if at < len(reference) else -1
    other_token = int(other[at]) if at < len(other) else -1
    if ref_token < 0:  # the reference ended (EOS or length) and the other went on: not a token choice
        return Divergence(at, ref_token, other_token)
    if tolerance is None:
        tolerance = NEAR_TIE_TOLERANCE.get(next(target.parameters()).dtype, 1e-3)
    logits = position_logits(target, reference, at, **inputs)
    gap, near = classify_divergence(logits, ref_token, other_token, tolerance)
    return Divergence(at, ref_token, other_token, gap, near)
