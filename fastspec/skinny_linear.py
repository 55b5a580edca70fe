"""The target's ``nn.Linear`` layers through :func:`fastspec.ops.skinny_linear` while fastspec decodes.

On a CPU without bf16 units, BLAS runs the [γ+1, K] inputs of a verify forward at 1.6-1.9× the
time of a 1-row step (MKL on AMD; bench/RESULTS.md), although both are bound by reading the
weights once. The skinny kernel reads them once per 8 rows, which lowers both the verify cost
ratio r and the autoregressive step. Only float32 CPU inputs of at most ``MAX_ROWS`` rows outside
autograd take it; everything else runs ``nn.Linear`` unchanged. The model is patched only inside
:func:`skinny_linears` (a class swap of the exact ``nn.Linear`` modules, undone on exit), so
weights, state dicts and the caller's model are untouched.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List

import torch

from fastspec import ops

# Rows of x per call that take the kernel (B·(γ+1) in a batched verify). Above 8 it makes another
# pass over the weights, yet on both cores it stays ahead of MKL: SmolLM2's 211 linears at 9/16/24
# rows took 2.14/2.20/1.67x less time than F.linear (bench/RESULTS.md, stop 21).
MAX_ROWS = 24

# The registered op's overload, resolved once (``.default`` skips the per-call overload lookup);
# None without the native build, where available() keeps every module an nn.Linear.
_KERNEL = torch.ops.fastspec.skinny_linear.default if ops.native_available() else None


def takes_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs on the skinny kernel. x: [..., K]."""
    if not x.is_cpu or x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # the native op has no backward
    return x.numel() <= MAX_ROWS * max(x.shape[-1], 1)


class SkinnyLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose few-row float32 CPU inputs run on the skinny kernel.

    It calls the registered op directly: the checks of ``ops.skinny_linear``'s Python face cost
    ≈ 8 µs a call, ×211 linears per SmolLM2 forward, and the native op checks shapes, dtypes and
    devices itself (ValueError)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not takes_kernel(x, weight):
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])  # [M,K]
        return _KERNEL(rows, weight, self.bias).view(*x.shape[:-1], self.out_features)


def available() -> bool:
    """The kernel is built and not switched off (``FASTSPEC_SKINNY_LINEAR=0``)."""
    return ops.native_available() and os.environ.get("FASTSPEC_SKINNY_LINEAR", "1") not in ("0", "false", "False")


def to_skinny(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Turn ``model``'s plain float32 CPU ``nn.Linear`` modules into :class:`SkinnyLinear` (a class
    swap: weights and state dict untouched); returns them. Nothing when the kernel is unavailable.
    Permanent use is for fastspec's own drafters, whose few-row calls take the kernel and whose
    training (autograd) falls back to ``nn.Linear``; a caller's model is swapped only by
    :func:`skinny_linears`."""
    if not available():
        return []
    swapped = [m for m in model.modules() if type(m) is torch.nn.Linear
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for module in swapped:
        module.__class__ = SkinnyLinear
    return swapped


def to_plain(modules) -> None:
    """Undo :func:`to_skinny` on ``modules`` (an iterable of modules; SkinnyLinear -> nn.Linear)."""
    for module in modules:
        if type(module) is SkinnyLinear:
            module.__class__ = torch.nn.Linear


# Rows of x that share one read of the weights (kSkinnyRowsPerPass in csrc/include/fastspec/skinny_linear.h).
ROWS_PER_PASS = 8
# Below this many bytes of float32 linear weights a model's weights stay in the CPU's caches, so
# another pass over them costs little: the verify-row cap (verify_rows_cap) is for larger models.
CAP_MIN_WEIGHT_BYTES = 64 << 20


def verify_rows_cap(model: torch.nn.Module) -> int:
    """The engine's default cap on a verify block's rows B·(γ+1) for ``model`` (0 = none).

    ROWS_PER_PASS when its linears run on the kernel (float32, CPU, built) and their weights outgrow
    the caches: a block of more rows reads every weight again, and batched speculation measured
    slower than batched autoregressive decoding there (SmolLM2 fp32, γ 4: 0.97× at batch 3, 0.89× at
    batch 8; at γ 1, batch 3: 1.16×; bench/RESULTS.md). So γ shrinks as the batch grows, and a
    batch of ≥ ROWS_PER_PASS rows decodes without drafts. No cap elsewhere: bf16 on a CPU with
    matrix units and CUDA verify wide blocks at little extra cost (bf16 batch 8, γ 4: 1.30×)."""
    if not available():
        return 0
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or any(m.weight.device.type != "cpu" or m.weight.dtype != torch.float32 for m in linears):
        return 0
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    return ROWS_PER_PASS if weight_bytes >= CAP_MIN_WEIGHT_BYTES else 0


@contextlib.contextmanager
def skinny_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run ``model``'s plain ``nn.Linear`` modules as :class:`SkinnyLinear` inside the block; yields
    how many were swapped (0 when disabled, unavailable, or none are float32 on the CPU)."""
    swapped = to_skinny(model) if enabled else []
    try:
        yield len(swapped)
    finally:
        to_plain(swapped)
