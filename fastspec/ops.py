"""Python face of fastspec's native ops, each with its pure-PyTorch reference twin.

Verification (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"):

    accept draft i   iff  u_i * q(d_i) < p(d_i)          (i.e. with probability min(1, p/q))
    first rejection:      recovered ~ norm(max(0, p_i - q_i))
    all γ accepted:       bonus     ~ p_γ

Randomness is drawn here, in Python, as ``uniforms = torch.rand(B, γ+1, float64)`` from the
caller's ``generator``; u[:, i] (i < γ) decides draft i and u[:, γ] draws the one target token
by an inverse-CDF scan in index order with a float64 running sum. Native ops and references
consume the same uniforms, so they give the same tokens and runs are reproducible.

Every public op dispatches to ``fastspec._C`` (CPU or CUDA by the tensors' device) when it is
built, else to the reference. The references are importable as ``fastspec.ops.reference.<op>``.
Bad values found by a kernel (NaN/inf, unnormalised rows, ids outside [0, V)) raise RuntimeError;
on CUDA that costs one copy of B status ints to the host per call (``FASTSPEC_CUDA_UNCHECKED=1``
skips it). 16-bit and float64 inputs are read as their float32 values.
"""
from __future__ import annotations

import types
from typing import Optional, Tuple

import torch

try:  # the extension registers torch.ops.fastspec.* when imported
    import fastspec._C  # noqa: F401

    _NATIVE = True
except ImportError:  # pragma: no cover - depends on the build
    _NATIVE = False

__all__ = [
    "native_available",
    "verify_greedy",
    "verify_sample",
    "process_logits",
    "fused_verify",
    "skinny_linear",
    "reference",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# |Σp − 1| allowed for a probability row, by input dtype (16-bit rounding of ~50k entries).
_SUM_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def native_available() -> bool:
    """True when the compiled extension ``fastspec._C`` was imported."""
    return _NATIVE


def _native_op(name: str, device: Optional[torch.device] = None):
    """The registered native op, or None (not built; or CUDA tensors and a CPU-only build)."""
    if not _NATIVE:
        return None
    if device is not None and device.type == "cuda" and not getattr(fastspec._C, "with_cuda", False):
        return None
    if device is not None and device.type not in ("cpu", "cuda"):
        return None  # e.g. meta: the reference raises the device errors
    return getattr(torch.ops.fastspec, name, None) if hasattr(torch.ops, "fastspec") else None


def _device_of(t) -> Optional[torch.device]:
    return t.device if isinstance(t, torch.Tensor) else None


def _register_fakes() -> None:
    """Shape-only (fake) implementations so torch.compile / export can trace the native ops."""
    if _native_op("fused_verify") is None:
        return

    def tokens_and_counts(t):  # t [B,γ+1,...] -> ([B,γ+1] int64, [B] int64)
        return t.new_empty(t.shape[:2], dtype=torch.long), t.new_empty(t.shape[:1], dtype=torch.long)

    torch.library.register_fake("fastspec::verify_greedy")(lambda target_logits, draft_tokens: tokens_and_counts(
        target_logits))
    torch.library.register_fake("fastspec::verify_sample")(
        lambda target_probs, draft_probs, draft_tokens, uniforms: tokens_and_counts(target_probs))
    torch.library.register_fake("fastspec::fused_verify")(
        lambda target_logits, draft_tokens, draft_probs, prev_tokens, uniforms, do_sample, temperature, top_k, top_p,
        repetition_penalty: tokens_and_counts(target_logits))
    torch.library.register_fake("fastspec::process_logits")(
        lambda logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty:
        logits.new_empty(logits.shape, dtype=torch.float32))


_register_fakes()


# ----------------------------------------------------------------------------------------------
# Validation shared by the native path and the references (cheap checks: shapes, dtypes, devices,
# scalars). Checks that need every value (NaN, sums, token ranges) run inside the native kernels
# (RuntimeError) or in the references (ValueError).
# ----------------------------------------------------------------------------------------------
def _check_float(name: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return t.float() if t.dtype == torch.float64 else t  # the kernels read float32: round float64 once


def _check_tokens(name: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    return t.long()


def _check_same_device(**tensors) -> torch.device:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
            raise ValueError(f"all tensors must be on the same device, got {listed}")
    return first


def _check_processing(do_sample, temperature, top_k, top_p, repetition_penalty) -> None:
    for name, v in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise ValueError(f"top_k must be an int, got {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")


def _draw_uniforms(batch: int, gamma: int, device: torch.device, generator: Optional[torch.Generator]):
    """u[B, γ+1] float64 in [0,1): u[:, i<γ] decide acceptance, u[:, γ] draws the final token."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch, gamma + 1, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device)


def _check_verify_greedy_args(target_logits, draft_tokens):
    target_logits = _check_float("target_logits", target_logits, 3)
    draft_tokens = _check_tokens("draft_tokens", draft_tokens, 2)
    B, K, V = target_logits.shape
    if draft_tokens.shape != (B, K - 1):
        raise ValueError(
            f"draft_tokens must have shape [B, γ] = [{B}, {K - 1}] for target_logits of shape "
            f"[B, γ+1, V] = {list(target_logits.shape)}, got {list(draft_tokens.shape)}"
        )
    if V == 0:
        raise ValueError("vocabulary size V must be > 0")
    _check_same_device(target_logits=target_logits, draft_tokens=draft_tokens)
    return target_logits.contiguous(), draft_tokens.contiguous()


def _check_verify_sample_args(target_probs, draft_probs, draft_tokens):
    target_probs = _check_float("target_probs", target_probs, 3)
    draft_tokens = _check_tokens("draft_tokens", draft_tokens, 2)
    B, K, V = target_probs.shape
    if V == 0:
        raise ValueError("vocabulary size V must be > 0")
    if draft_tokens.shape != (B, K - 1):
        raise ValueError(
            f"draft_tokens must have shape [B, γ] = [{B}, {K - 1}] for target_probs of shape "
            f"[B, γ+1, V] = {list(target_probs.shape)}, got {list(draft_tokens.shape)}"
        )
    if draft_probs is not None:
        draft_probs = _check_float("draft_probs", draft_probs, 3)
        if draft_probs.shape != (B, K - 1, V):
            raise ValueError(
                f"draft_probs must have shape [B, γ, V] = [{B}, {K - 1}, {V}], got {list(draft_probs.shape)}"
            )
        draft_probs = draft_probs.contiguous()
    _check_same_device(target_probs=target_probs, draft_probs=draft_probs, draft_tokens=draft_tokens)
    return target_probs.contiguous(), draft_probs, draft_tokens.contiguous()


def _check_prev_tokens(prev_tokens, batch, device):
    if prev_tokens is None:
        return None
    prev_tokens = _check_tokens("prev_tokens", prev_tokens, 2)
    if prev_tokens.shape[0] != batch:
        raise ValueError(f"prev_tokens must have shape [B, L] with B = {batch}, got {list(prev_tokens.shape)}")
    if prev_tokens.device != device:
        raise ValueError(f"prev_tokens is on {prev_tokens.device} but the logits are on {device}: all tensors must be on the same device")
    return prev_tokens.contiguous()


# ----------------------------------------------------------------------------------------------
# References (pure PyTorch, vectorized). These define the semantics the native kernels must equal.
# ----------------------------------------------------------------------------------------------
def _ref_check_tokens_in_range(name: str, tokens: torch.Tensor, vocab: int) -> None:
    if tokens.numel() and (bool((tokens < 0).any()) or bool((tokens >= vocab).any())):
        bad = tokens[(tokens < 0) | (tokens >= vocab)][0].item()
        raise ValueError(f"{name} holds token id {bad} outside [0, V={vocab})")


def _ref_check_probs(name: str, probs: torch.Tensor) -> None:
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} holds NaN or inf")
    if bool((probs < 0).any()):
        raise ValueError(f"{name} holds negative probabilities")
    if probs.numel():
        sums = probs.double().sum(-1)
        worst = (sums - 1).abs().max().item()
        if worst > _SUM_TOLERANCE[probs.dtype]:
            raise ValueError(
                f"{name} rows must sum to 1 (tolerance {_SUM_TOLERANCE[probs.dtype]:g} for {probs.dtype}), "
                f"found a row off by {worst:.3g}"
            )


def _ref_greedy_core(scores: torch.Tensor, draft_tokens: torch.Tensor):
    """scores [B,γ+1,V] (any float), draft_tokens [B,γ] -> (output_tokens [B,γ+1], num_accepted [B])."""
    B, K, _ = scores.shape
    gamma = K - 1
    target_tokens = scores.argmax(-1)  # [B,γ+1] first maximal index
    matches = (draft_tokens == target_tokens[:, :gamma]).long()  # [B,γ]
    num_accepted = matches.cumprod(-1).sum(-1)  # [B]
    positions = torch.arange(K, device=scores.device).expand(B, K)
    drafts_padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)  # [B,γ+1]
    final = target_tokens.gather(1, num_accepted[:, None])  # [B,1] recovered or bonus
    out = torch.where(positions < num_accepted[:, None], drafts_padded, torch.full_like(drafts_padded, -1))
    out = torch.where(positions == num_accepted[:, None], final.expand(B, K), out)
    return out, num_accepted


def _ref_inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [B,V] float64 >= 0, u [B] in [0,1) -> [B] the first index whose running sum (index
    order, float64) exceeds u * total. Zero-weight indices are never chosen."""
    cdf = weights.cumsum(-1)  # sequential float64 running sum on CPU
    total = cdf[:, -1]
    idx = (cdf <= (u * total)[:, None]).sum(-1)  # count of prefix sums <= target = first index above it
    # u * total can round up to total when u is within 2^-53 of 1: take the last positive weight.
    last_positive = (weights > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(idx, last_positive)


def _ref_sample_core(p: torch.Tensor, q: Optional[torch.Tensor], draft_tokens: torch.Tensor, u: torch.Tensor):
    """p [B,γ+1,V] float64, q [B,γ,V] float64 or None (one-hot at the draft), draft_tokens [B,γ],
    u [B,γ+1] float64 -> (output_tokens [B,γ+1], num_accepted [B])."""
    B, K, V = p.shape
    gamma = K - 1
    rows = torch.arange(B, device=p.device)
    p_draft = p[:, :gamma].gather(-1, draft_tokens[..., None])[..., 0]  # [B,γ] p_i(d_i)
    q_draft = torch.ones_like(p_draft) if q is None else q.gather(-1, draft_tokens[..., None])[..., 0]
    accepted = (u[:, :gamma] * q_draft < p_draft).long()  # [B,γ]
    num_accepted = accepted.cumprod(-1).sum(-1)  # [B]
    p_final = p[rows, num_accepted]  # [B,V] p at the first rejection, or p_γ for the bonus
    rejected = num_accepted < gamma  # [B]
    q_final = torch.zeros_like(p_final)
    if gamma > 0:
        at = num_accepted.clamp(max=gamma - 1)
        if q is None:
            q_final.scatter_(1, draft_tokens[rows, at][:, None], 1.0)
        else:
            q_final = q[rows, at].clone()
        q_final[~rejected] = 0.0
    residual = (p_final - q_final).clamp(min=0.0)  # norm(max(0, p − q)); equals p for the bonus
    empty = residual.sum(-1) <= 0  # p ≤ q everywhere (only with unnormalised inputs): use p
    residual = torch.where(empty[:, None], p_final, residual)
    final_token = _ref_inverse_cdf(residual, u[:, gamma])
    positions = torch.arange(K, device=p.device).expand(B, K)
    drafts_padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    out = torch.where(positions < num_accepted[:, None], drafts_padded, torch.full_like(drafts_padded, -1))
    out = torch.where(positions == num_accepted[:, None], final_token[:, None].expand(B, K), out)
    return out, num_accepted


def _ref_seen_mask(prev_tokens, draft_tokens, B: int, K: int, V: int, device) -> torch.Tensor:
    """[B,K,V] bool: position k has seen prev_tokens (ids outside [0,V) ignored) ∪ draft_tokens[:, :k]."""
    seen = torch.zeros(B, K, V, dtype=torch.bool, device=device)
    if prev_tokens is not None and prev_tokens.numel():
        valid = (prev_tokens >= 0) & (prev_tokens < V)
        prev_mask = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
        prev_mask.scatter_(1, torch.where(valid, prev_tokens, V), True)
        seen |= prev_mask[:, None, :V]
    for k in range(1, K):
        seen[:, k] = seen[:, k - 1]
        seen[:, k].scatter_(1, draft_tokens[:, k - 1 : k], True)
    return seen


def _ref_penalize(logits32: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: seen logits x -> x*penalty if x < 0 else x/penalty (float32)."""
    if penalty == 1.0:
        return logits32
    penalized = torch.where(logits32 < 0, logits32 * penalty, logits32 / penalty)
    return torch.where(seen, penalized, logits32)


def _ref_warp_probs64(scores32: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """scores [...,V] float32 (after repetition penalty) -> float64 probabilities after
    TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper(min_tokens_to_keep=1) -> softmax.

    Top-k keeps every token tied with the k-th largest value (as HF: removes x < kth).
    Top-p orders tokens ascending by (value, index) — HF's torch.sort order when it is stable — and
    removes a token when the float64 mass of the tokens after it in that order is >= top_p
    (HF: cumsum_ascending <= 1 - top_p), so the largest token is always kept.
    """
    V = scores32.shape[-1]
    x = scores32 / temperature if temperature != 1.0 else scores32
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    # float64 weights exp(x - max); the top-p walk compares unnormalised masses against top_p * Σ,
    # which keeps exact ties (equal logits) exact in any summation order.
    weights = torch.exp(x.double() - x.amax(-1, keepdim=True).double())
    if top_p < 1.0:
        total = weights.sum(-1, keepdim=True)
        _, order = torch.sort(x, dim=-1, descending=False, stable=True)
        descending = weights.gather(-1, order).flip(-1)
        # mass after position j in ascending order = exclusive prefix sum of the descending order
        after = torch.cat([torch.zeros_like(descending[..., :1]), descending.cumsum(-1)[..., :-1]], -1).flip(-1)
        remove = torch.zeros_like(after, dtype=torch.bool).scatter(-1, order, after >= top_p * total)
        weights = weights.masked_fill(remove, 0.0)
    return weights / weights.sum(-1, keepdim=True)


def _ref_check_logits(name: str, logits: torch.Tensor, do_sample: bool) -> None:
    if bool(torch.isnan(logits).any()):
        raise ValueError(f"{name} holds NaN")
    if do_sample:
        if bool(torch.isposinf(logits).any()):
            raise ValueError(f"{name} holds +inf, which has no probability under softmax")
        if logits.numel() and bool(torch.isneginf(logits).all(-1).any()):
            raise ValueError(f"{name} has a row where every logit is -inf")


def _ref_process(logits3, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty):
    """logits3 [B,K,V] -> float64 probabilities (do_sample) or float32 penalised logits."""
    B, K, V = logits3.shape
    logits32 = logits3.float()
    _ref_check_logits("logits", logits32, do_sample)
    if prev_tokens is not None:
        prev_tokens = prev_tokens.long()
    if draft_tokens is None:
        draft_tokens = torch.zeros(B, 0, dtype=torch.long, device=logits3.device)
    _ref_check_tokens_in_range("draft_tokens", draft_tokens, V)
    if repetition_penalty != 1.0:
        seen = _ref_seen_mask(prev_tokens, draft_tokens, B, K, V, logits3.device)
        logits32 = _ref_penalize(logits32, seen, repetition_penalty)
    if not do_sample:
        return logits32
    return _ref_warp_probs64(logits32, temperature, top_k, top_p)


def _ref_verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor):
    """Reference twin of :func:`verify_greedy`."""
    target_logits, draft_tokens = _check_verify_greedy_args(target_logits, draft_tokens)
    V = target_logits.shape[-1]
    _ref_check_tokens_in_range("draft_tokens", draft_tokens, V)
    if bool(torch.isnan(target_logits).any()):
        raise ValueError("target_logits holds NaN")
    return _ref_greedy_core(target_logits.float(), draft_tokens)


def _ref_verify_sample(target_probs, draft_probs, draft_tokens, *, generator=None, uniforms=None):
    """Reference twin of :func:`verify_sample` (``uniforms`` [B,γ+1] float64 overrides ``generator``)."""
    target_probs, draft_probs, draft_tokens = _check_verify_sample_args(target_probs, draft_probs, draft_tokens)
    B, K, V = target_probs.shape
    _ref_check_tokens_in_range("draft_tokens", draft_tokens, V)
    _ref_check_probs("target_probs", target_probs)
    if draft_probs is not None:
        _ref_check_probs("draft_probs", draft_probs)
    if uniforms is None:
        uniforms = _draw_uniforms(B, K - 1, target_probs.device, generator)
    q = None if draft_probs is None else draft_probs.double()
    return _ref_sample_core(target_probs.double(), q, draft_tokens, uniforms.double())


def _as_3d_logits(logits: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 2:
        return logits[:, None, :], True
    return logits, False


def _check_process_args(logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty):
    _check_processing(do_sample, temperature, top_k, top_p, repetition_penalty)
    logits3, squeeze = _as_3d_logits(logits)
    logits3 = _check_float("logits", logits3, 3)
    B, K, V = logits3.shape
    if V == 0:
        raise ValueError("vocabulary size V must be > 0")
    prev_tokens = _check_prev_tokens(prev_tokens, B, logits3.device)
    if draft_tokens is not None:
        draft_tokens = _check_tokens("draft_tokens", draft_tokens, 2)
        if draft_tokens.shape != (B, K - 1):
            raise ValueError(f"draft_tokens must have shape [B, K-1] = [{B}, {K - 1}], got {list(draft_tokens.shape)}")
        _check_same_device(logits=logits3, draft_tokens=draft_tokens)
        draft_tokens = draft_tokens.contiguous()
    return logits3.contiguous(), squeeze, prev_tokens, draft_tokens


def _ref_process_logits(
    logits, *, prev_tokens=None, draft_tokens=None, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    repetition_penalty=1.0,
):
    """Reference twin of :func:`process_logits`."""
    logits3, squeeze, prev_tokens, draft_tokens = _check_process_args(
        logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty
    )
    out = _ref_process(logits3, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    out = out.float()
    return out[:, 0] if squeeze else out


def _check_fused_args(target_logits, draft_tokens, draft_probs, prev_tokens, do_sample, temperature, top_k, top_p,
                      repetition_penalty):
    _check_processing(do_sample, temperature, top_k, top_p, repetition_penalty)
    target_logits, draft_tokens = _check_verify_greedy_args(target_logits, draft_tokens)
    B, K, V = target_logits.shape
    if draft_probs is not None:
        if not do_sample:
            raise ValueError("draft_probs is only used when do_sample=True; pass None for greedy verification")
        draft_probs = _check_float("draft_probs", draft_probs, 3)
        if draft_probs.shape != (B, K - 1, V):
            raise ValueError(
                f"draft_probs must have shape [B, γ, V] = [{B}, {K - 1}, {V}], got {list(draft_probs.shape)}"
            )
        _check_same_device(target_logits=target_logits, draft_probs=draft_probs)
        draft_probs = draft_probs.contiguous()
    prev_tokens = _check_prev_tokens(prev_tokens, B, target_logits.device)
    return target_logits, draft_tokens, draft_probs, prev_tokens


def _ref_fused_verify(
    target_logits, draft_tokens, draft_probs=None, *, prev_tokens=None, do_sample=False, temperature=1.0, top_k=0,
    top_p=1.0, repetition_penalty=1.0, generator=None, uniforms=None,
):
    """Reference twin of :func:`fused_verify` (``uniforms`` [B,γ+1] float64 overrides ``generator``)."""
    target_logits, draft_tokens, draft_probs, prev_tokens = _check_fused_args(
        target_logits, draft_tokens, draft_probs, prev_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty,
    )
    B, K, V = target_logits.shape
    processed = _ref_process(
        target_logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty
    )
    if not do_sample:
        return _ref_greedy_core(processed, draft_tokens)
    if draft_probs is not None:
        _ref_check_probs("draft_probs", draft_probs)
    if uniforms is None:
        uniforms = _draw_uniforms(B, K - 1, target_logits.device, generator)
    q = None if draft_probs is None else draft_probs.double()
    return _ref_sample_core(processed, q, draft_tokens, uniforms.double())



# ----------------------------------------------------------------------------------------------
# skinny_linear: y = x · wᵀ (+ bias) for a few fp32 rows (the target's verify forwards on a CPU).
# ----------------------------------------------------------------------------------------------
SKINNY_LANES = 8  # the kernel's partial sums per output (csrc/include/fastspec/skinny_linear.h)


def _check_skinny_args(x, weight, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"skinny_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        rank = 1 if name == "bias" else 2
        if t.dim() != rank:
            raise ValueError(f"skinny_linear: {name} must have rank {rank}, got shape {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"skinny_linear: {name} must be float32, got {t.dtype}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_linear: x is {tuple(x.shape)} but weight is {tuple(weight.shape)}; "
                         "their last dims must match")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"skinny_linear: bias has {bias.shape[0]} entries, weight has {weight.shape[0]} rows")
    _check_same_device(x=x, weight=weight, bias=bias)


def _ref_skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M,K], weight [N,K], bias [N] -> [M,N], summed exactly as the native kernel: 8 lane sums of
    rounded products, a fixed lane tree, the K % 8 tail in order, then the bias."""
    _check_skinny_args(x, weight, bias)
    k = x.shape[1]
    k8 = k - k % SKINNY_LANES
    lanes = x.new_zeros(x.shape[0], weight.shape[0], SKINNY_LANES)  # [M,N,8]
    for c in range(0, k8, SKINNY_LANES):
        lanes = lanes + x[:, None, c : c + SKINNY_LANES] * weight[None, :, c : c + SKINNY_LANES]
    pairs = lanes[..., :4] + lanes[..., 4:]  # lane l + lane l+4
    total = (pairs[..., 0] + pairs[..., 2]) + (pairs[..., 1] + pairs[..., 3])
    for t in range(k8, k):
        total = total + x[:, None, t] * weight[None, :, t]
    return total + bias if bias is not None else total

reference = types.SimpleNamespace(
    verify_greedy=_ref_verify_greedy,
    verify_sample=_ref_verify_sample,
    process_logits=_ref_process_logits,
    fused_verify=_ref_fused_verify,
    skinny_linear=_ref_skinny_linear,
)


# ----------------------------------------------------------------------------------------------
# Public ops: native when built (CPU or CUDA by device), else the reference.
# ----------------------------------------------------------------------------------------------
def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor):
    """Greedy verification: keep the longest prefix of drafts equal to the target's argmax.

    Args:
        target_logits: target scores. Shape: ``[B, γ+1, V]``, float32/bfloat16/float16.
        draft_tokens: drafted ids. Shape: ``[B, γ]``, int64 in ``[0, V)``.

    Returns:
        ``(output_tokens [B, γ+1] int64, num_accepted [B] int64)``: row b holds its
        ``num_accepted[b]`` accepted drafts, then the target's token at the first mismatch
        (recovered) or at position γ (bonus), then −1 padding. The target's token is the first
        maximal index, as ``torch.argmax``.

    Example:
        >>> logits = torch.tensor([[[0., 5., 1.], [4., 0., 0.], [0., 0., 3.]]])
        >>> verify_greedy(logits, torch.tensor([[1, 2]]))
        (tensor([[ 1,  0, -1]]), tensor([1]))
    """
    op = _native_op("verify_greedy", _device_of(target_logits))
    if op is None:
        return _ref_verify_greedy(target_logits, draft_tokens)
    target_logits, draft_tokens = _check_verify_greedy_args(target_logits, draft_tokens)
    return tuple(op(target_logits, draft_tokens))


def verify_sample(target_probs, draft_probs, draft_tokens, *, generator: Optional[torch.Generator] = None):
    """Speculative-sampling verification (Leviathan et al. 2023).

    Args:
        target_probs: target distributions p. Shape: ``[B, γ+1, V]``; rows sum to 1.
        draft_probs: draft distributions q. Shape: ``[B, γ, V]``, or None for a deterministic
            drafter (q is one-hot at the draft token, so draft i is accepted with probability p_i(d_i)).
        draft_tokens: drafted ids. Shape: ``[B, γ]``.
        generator: the source of the ``[B, γ+1]`` uniforms; same seed, same output.

    Returns:
        ``(output_tokens [B, γ+1] int64 −1 padded, num_accepted [B] int64)``. Each emitted token is
        distributed exactly as the target's p.

    Example:
        >>> p = torch.tensor([[[0., 1.], [1., 0.]]])        # the target is certain: token 1, then 0
        >>> verify_sample(p, None, torch.tensor([[1]]))
        (tensor([[1, 0]]), tensor([1]))
    """
    op = _native_op("verify_sample", _device_of(target_probs))
    if op is None:
        return _ref_verify_sample(target_probs, draft_probs, draft_tokens, generator=generator)
    target_probs, draft_probs, draft_tokens = _check_verify_sample_args(target_probs, draft_probs, draft_tokens)
    B, K, _ = target_probs.shape
    uniforms = _draw_uniforms(B, K - 1, target_probs.device, generator)
    return tuple(op(target_probs, draft_probs, draft_tokens, uniforms))


def process_logits(
    logits, *, prev_tokens=None, draft_tokens=None, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    repetition_penalty=1.0,
):
    """The target's processing: repetition penalty -> temperature -> top-k -> top-p -> softmax.

    Equal to transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1) applied in that order.
    Drafters use it to compute q with the same processors as the target.

    Args:
        logits: Shape: ``[B, K, V]`` or ``[B, V]``.
        prev_tokens: the tokens before position 0. Shape: ``[B, L]`` int64; ids outside ``[0, V)``
            (e.g. −1 padding) are ignored.
        draft_tokens: Shape: ``[B, K-1]``; position k also counts ``draft_tokens[:, :k]`` as
            previous tokens for the repetition penalty.

    Returns:
        float32 probabilities shaped like ``logits`` when ``do_sample``, else the
        repetition-penalised float32 logits (greedy takes their argmax).
    """
    op = _native_op("process_logits", _device_of(logits))
    if op is None:
        return _ref_process_logits(
            logits, prev_tokens=prev_tokens, draft_tokens=draft_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        )
    logits3, squeeze, prev_tokens, draft_tokens = _check_process_args(
        logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty
    )
    out = op(logits3, prev_tokens, draft_tokens, bool(do_sample), float(temperature), int(top_k),
             float(top_p), float(repetition_penalty))
    return out[:, 0] if squeeze else out


def fused_verify(
    target_logits, draft_tokens, draft_probs=None, *, prev_tokens=None, do_sample=False, temperature=1.0, top_k=0,
    top_p=1.0, repetition_penalty=1.0, generator: Optional[torch.Generator] = None,
):
    """Raw target logits -> verification result in one native pass.

    Position i is processed as :func:`process_logits` with previous tokens
    ``prev_tokens ∪ draft_tokens[:, :i]``, then greedy (``do_sample=False``: argmax of the
    penalised logits) or speculative-sampling acceptance as :func:`verify_sample`. No
    ``[B, γ+1, V]`` probability tensor is materialised. γ may be 0: one token from position 0,
    i.e. plain autoregressive decoding.

    Args:
        target_logits: Shape: ``[B, γ+1, V]``.
        draft_tokens: Shape: ``[B, γ]``.
        draft_probs: Shape: ``[B, γ, V]`` (the drafter's processed q) or None (deterministic drafter).
        prev_tokens: Shape: ``[B, L]``, ids outside ``[0, V)`` ignored.

    Returns:
        ``(output_tokens [B, γ+1] int64 −1 padded, num_accepted [B] int64)``.
    """
    op = _native_op("fused_verify", _device_of(target_logits))
    if op is None:
        return _ref_fused_verify(
            target_logits, draft_tokens, draft_probs, prev_tokens=prev_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            generator=generator,
        )
    target_logits, draft_tokens, draft_probs, prev_tokens = _check_fused_args(
        target_logits, draft_tokens, draft_probs, prev_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty,
    )
    B, K, _ = target_logits.shape
    uniforms = _draw_uniforms(B, K - 1, target_logits.device, generator) if do_sample else None
    return tuple(
        op(target_logits, draft_tokens, draft_probs, prev_tokens, uniforms, bool(do_sample),
           float(temperature), int(top_k), float(top_p), float(repetition_penalty))
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x · weightᵀ + bias`` for a few float32 rows, reading ``weight`` once per 8 rows of x.

    BLAS is tuned for many rows; at the 2-8 rows of a verify forward it can cost nearly as much as
    one pass per row (bench/RESULTS.md). Each output is summed in one fixed order (see
    ``reference.skinny_linear``), so a row's result does not depend on how many rows share the call.
    No autograd.

    Args:
        x: Shape: ``[M, K]`` float32.
        weight: Shape: ``[N, K]`` float32 (an ``nn.Linear`` weight).
        bias: Shape: ``[N]`` float32, or None.

    Returns:
        ``[M, N]`` float32.
    """
    _check_skinny_args(x, weight, bias)
    op = _native_op("skinny_linear", x.device) if x.device.type == "cpu" else None
    if op is None:
        return _ref_skinny_linear(x, weight, bias)
    return op(x, weight, bias)


from fastspec.ngram import NgramTable, ReferenceNgramTable  # noqa: E402,F401  (the n-gram table op, op 4)
