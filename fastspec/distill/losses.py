"""Knowledge-distillation divergences between the target (teacher) and a drafter (student).

All functions take ``teacher_logits`` and ``student_logits`` of shape [N,V] (one row per
token position; flatten [B,T,V] first), an optional ``mask`` [N] (1/True = count the row),
and return the mean over counted rows (0 when no row counts). Gradients flow to the
student only; the teacher is detached.

With temperature T both distributions are ``softmax(logits / T)``:
    p = softmax(teacher / T),  q = softmax(student / T)

* ``fkl``  forward KL(p || q): the seed's loss (Hinton et al. 2015). Multiplied by T²:
  the gradient of the softened KL w.r.t. the student logits scales as 1/T², so T² keeps
  its magnitude comparable to the cross-entropy term when T changes.
* ``rkl``  reverse KL(q || p), also × T² (DistillSpec).
* ``jsd``  generalized Jensen-Shannon JSD[β](p, q) = β·KL(p‖m) + (1−β)·KL(q‖m),
  m = β·p + (1−β)·q (DistillSpec, β = 0.5 by default), × T².
* ``tvd``  total variation ½·Σ|p − q| (DistillSpec). Bounded in [0, 1]; not T²-scaled.
  TVD is the quantity speculative decoding cares about: α = 1 − TVD(p, q) per position.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def _check(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: Optional[torch.Tensor]):
    if teacher_logits.dim() != 2 or student_logits.dim() != 2:
        raise ValueError(f"logits must be [N,V]; got teacher {tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} logits differ in shape "
            "(the drafter's vocabulary must equal the target's)"
        )
    if mask is not None and mask.shape != teacher_logits.shape[:1]:
        raise ValueError(f"mask must be [N]={teacher_logits.shape[0]}; got {tuple(mask.shape)}")


def _masked_mean(per_row: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    # per_row: [N]
    if mask is None:
        return per_row.mean() if per_row.numel() else per_row.sum()
    weights = mask.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp_min(1.0)


def _log_probs(teacher_logits, student_logits, temperature):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # [N,V]
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N,V]
    return log_p, log_q


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a‖b) from log-probs [N,V]; 0·log 0 = 0 (xlogy semantics)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def fkl(teacher_logits, student_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p‖q) × T² (the seed's KD loss)."""
    _check(teacher_logits, student_logits, mask)
    log_p, log_q = _log_probs(teacher_logits, student_logits, temperature)
    return _masked_mean(_kl(log_p, log_q), mask) * temperature**2


def rkl(teacher_logits, student_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(q‖p) × T²."""
    _check(teacher_logits, student_logits, mask)
    log_p, log_q = _log_probs(teacher_logits, student_logits, temperature)
    return _masked_mean(_kl(log_q, log_p), mask) * temperature**2


def jsd(teacher_logits, student_logits, mask=None, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """JSD[β](p, q) = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q, × T²."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    _check(teacher_logits, student_logits, mask)
    log_p, log_q = _log_probs(teacher_logits, student_logits, temperature)
    # log m = logsumexp(log β + log p, log(1−β) + log q), stable for tiny probabilities
    log_m = torch.logsumexp(
        torch.stack([log_p + torch.log(torch.tensor(beta)), log_q + torch.log(torch.tensor(1.0 - beta))]), dim=0
    )
    per_row = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _masked_mean(per_row, mask) * temperature**2


def tvd(teacher_logits, student_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Total variation ½·Σ|p − q| (no T² factor)."""
    _check(teacher_logits, student_logits, mask)
    log_p, log_q = _log_probs(teacher_logits, student_logits, temperature)
    return _masked_mean(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), mask)


def divergence(name: str, teacher_logits, student_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Dispatch by name: one of :data:`DIVERGENCES`."""
    table = {"fkl": fkl, "rkl": rkl, "jsd": jsd, "tvd": tvd}
    if name not in table:
        raise ValueError(f"unknown divergence {name!r}; choose from {DIVERGENCES}")
    return table[name](teacher_logits, student_logits, mask, temperature=temperature)


def dense_teacher(top_log_p: torch.Tensor, top_cols: torch.Tensor, tail_log_p: torch.Tensor, width: int) -> torch.Tensor:
    """The teacher [N,width] that holds top_log_p [N,k] at columns top_cols [N,k] (−1 = no column:
    dropped) and tail_log_p [N] in every other column."""
    n = top_log_p.shape[0]
    dense = tail_log_p[:, None].expand(n, width + 1).clone()  # column `width` collects the dropped entries
    return dense.scatter(1, torch.where(top_cols >= 0, top_cols, width), top_log_p)[:, :width]


class _SparseSoftCrossEntropy(torch.autograd.Function):
    """−Σ_i p_i log softmax(b)_i per row, for p = p_top [N,k] at columns cols [N,k] and p_tail [N]
    in every other column; tail_at_top [N,k] is p_tail where a top entry is a real column, 0 where
    it is not (then its p_top is 0 too). Its own backward, q − p, is three in-place passes over
    [N,V]; autograd through logsumexp, sum and gather took ~3× as long."""

    @staticmethod
    def forward(ctx, b, cols, p_top, p_tail, tail_at_top):
        log_q = torch.log_softmax(b, -1)  # [N,V]: one fused pass, where logsumexp's CPU kernel takes four
        ctx.save_for_backward(log_q, cols, p_top, p_tail, tail_at_top)
        return -(p_tail * log_q.sum(-1) + ((p_top - tail_at_top) * log_q.gather(1, cols)).sum(-1))

    @staticmethod
    def backward(ctx, grad_row):
        log_q, cols, p_top, p_tail, tail_at_top = ctx.saved_tensors
        grad = log_q.exp().sub_(p_tail[:, None])  # q − p outside the top columns
        grad.scatter_add_(1, cols, tail_at_top - p_top)
        return grad.mul_(grad_row[:, None]), None, None, None, None


def sparse_teacher_divergence(name: str, top_log_p: torch.Tensor, top_cols: torch.Tensor, tail_log_p: torch.Tensor,
                              student_logits: torch.Tensor, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """``divergence(name, dense_teacher(top_log_p, top_cols, tail_log_p, V), student_logits, mask, T)``.

    A top-k teacher cache is k values and one tail value per row, so fkl and rkl need only
    gathers of the student at the k columns and two reductions over V (its logsumexp and sum)
    instead of the ~10 full [N,V] passes of the dense form: the drafters' training step is
    dominated by these losses (feature drafter on SmolLM2: ~60% of a step). jsd and tvd build
    the dense teacher. top_log_p/top_cols: [N,k] (distinct columns, −1 = none); tail_log_p: [N];
    student_logits: [N,V].
    """
    if name not in ("fkl", "rkl"):
        return divergence(name, dense_teacher(top_log_p, top_cols, tail_log_p, student_logits.shape[1]),
                          student_logits, mask, temperature=temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_log_p.shape != top_cols.shape or top_log_p.dim() != 2 or tail_log_p.shape != top_log_p.shape[:1] \
            or student_logits.dim() != 2 or student_logits.shape[0] != top_log_p.shape[0]:
        raise ValueError(f"need top_log_p/top_cols [N,k], tail_log_p [N] and student_logits [N,V]; got "
                         f"{tuple(top_log_p.shape)}, {tuple(top_cols.shape)}, {tuple(tail_log_p.shape)}, "
                         f"{tuple(student_logits.shape)}")
    if mask is not None and mask.shape != top_log_p.shape[:1]:
        raise ValueError(f"mask must be [N]={top_log_p.shape[0]}; got {tuple(mask.shape)}")
    width = student_logits.shape[1]
    valid = top_cols >= 0  # [N,k]
    cols = top_cols.clamp_min(0)
    # teacher p = softmax(D / T): the k top entries and `others` equal tail entries
    top_a = torch.where(valid, top_log_p.detach().float() / temperature, float("-inf"))  # [N,k]
    tail_a = tail_log_p.detach().float() / temperature  # [N]
    others = (width - valid.sum(-1)).to(tail_a.dtype)  # [N]
    tail_term = torch.where(others > 0, tail_a + others.clamp_min(1).log(), float("-inf"))
    log_z = torch.logsumexp(torch.cat([top_a, tail_term[:, None]], 1), -1)  # [N]
    log_p_top, log_p_tail = top_a - log_z[:, None], tail_a - log_z  # [N,k], [N]
    p_top = torch.where(valid, log_p_top.exp(), 0.0)
    p_tail = torch.where(others > 0, log_p_tail.exp(), 0.0)
    # student log q = b − L, b = logits / T
    b = student_logits.float()
    b = b / temperature if temperature != 1.0 else b  # [N,V]
    if name == "fkl":  # Σ p log p − Σ p log q
        neg_entropy = torch.xlogy(p_top, p_top).sum(-1) + others * torch.xlogy(p_tail, p_tail)
        per_row = neg_entropy + _SparseSoftCrossEntropy.apply(b, cols, p_top, p_tail, valid * p_tail[:, None])
    else:  # rkl: Σ q log q − Σ q log p
        log_norm = torch.logsumexp(b, -1)  # [N]
        q = torch.softmax(b, -1)
        q_top = torch.where(valid, q.gather(1, cols), 0.0)  # [N,k]
        q_log_q = (q * b).sum(-1) - log_norm
        q_log_p = (q_top * torch.where(valid, log_p_top, 0.0)).sum(-1) + (1.0 - q_top.sum(-1)) * torch.where(
            others > 0, log_p_tail, 0.0)
        per_row = q_log_q - q_log_p
    return _masked_mean(per_row, mask) * temperature**2


def masked_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Mean token cross-entropy. student_logits: [N,V]; labels: [N] int64; mask: [N]."""
    if student_logits.dim() != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(f"need logits [N,V] and labels [N]; got {tuple(student_logits.shape)} and {tuple(labels.shape)}")
    per_row = F.cross_entropy(student_logits.float(), labels.clamp_min(0), reduction="none")
    return _masked_mean(per_row, mask)


def topk_to_logits(values: torch.Tensor, indices: torch.Tensor, logsumexp: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense teacher logits [N,V] from a top-k cache.

    values/indices: [N,k] the k largest logits and their ids; logsumexp: [N] of the full
    logits. The probability mass outside the top k (1 − Σ top-k p) is spread uniformly
    over the other V − k ids, so every divergence stays finite. Exact for the top-k ids.
    """
    if values.shape != indices.shape or values.dim() != 2 or logsumexp.shape != values.shape[:1]:
        raise ValueError("top-k cache needs values [N,k], indices [N,k] and logsumexp [N]")
    n, k = values.shape
    log_p_top = values.float() - logsumexp.float()[:, None]  # [N,k]
    if k >= vocab_size:
        dense = torch.full((n, vocab_size), float("-inf"))
        return dense.scatter(1, indices.long(), log_p_top)
    tail_mass = (1.0 - log_p_top.exp().sum(-1)).clamp_min(1e-12)  # [N]
    tail_log_p = torch.log(tail_mass / (vocab_size - k))  # [N]
    dense = tail_log_p[:, None].expand(n, vocab_size).clone()
    return dense.scatter(1, indices.long(), log_p_top)
