"""KD divergences against hand-computed values; gradients; the top-k cache reconstruction."""
import math

import pytest
import torch

from fastspec.distill.losses import (dense_teacher, divergence, fkl, jsd, masked_cross_entropy, rkl,
                                     sparse_teacher_divergence, topk_to_logits, tvd)

# p = softmax(teacher) = [1/4, 3/4]; q = softmax(student) = [1/2, 1/2]
TEACHER = torch.tensor([[0.0, math.log(3.0)]])
STUDENT = torch.tensor([[0.0, 0.0]])
FKL = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
RKL = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
M = (0.375, 0.625)
JSD = 0.5 * (0.25 * math.log(0.25 / M[0]) + 0.75 * math.log(0.75 / M[1])) + 0.5 * (
    0.5 * math.log(0.5 / M[0]) + 0.5 * math.log(0.5 / M[1])
)
TVD = 0.25


@pytest.mark.parametrize("fn,expected", [(fkl, FKL), (rkl, RKL), (jsd, JSD), (tvd, TVD)])
def test_hand_computed(fn, expected):
    assert fn(TEACHER, STUDENT).item() == pytest.approx(expected, abs=1e-6)
    assert fn(TEACHER, TEACHER).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name,expected,scaled", [("fkl", FKL, True), ("rkl", RKL, True), ("jsd", JSD, True), ("tvd", TVD, False)])
def test_temperature_and_t2_factor(name, expected, scaled):
    # logits doubled at T=2 give the same p and q; KL-type losses are multiplied by T² = 4
    value = divergence(name, TEACHER * 2, STUDENT * 2, temperature=2.0).item()
    assert value == pytest.approx(expected * (4.0 if scaled else 1.0), abs=1e-6)


def test_mask_selects_rows():
    teacher = torch.cat([TEACHER, torch.tensor([[5.0, -5.0]])])  # [2,2]
    student = torch.cat([STUDENT, torch.tensor([[-5.0, 5.0]])])
    mask = torch.tensor([True, False])
    assert fkl(teacher, student, mask).item() == pytest.approx(FKL, abs=1e-6)
    both = fkl(teacher, student).item()
    assert both > FKL  # the masked row is far off and would count
    assert fkl(teacher, student, torch.tensor([False, False])).item() == 0.0


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_gradients_finite_and_teacher_detached(name):
    torch.manual_seed(0)
    teacher = (torch.randn(7, 111) * 20).requires_grad_()  # peaky: probabilities underflow to 0
    teacher.data[0, 5] = 1e4
    student = (torch.randn(7, 111) * 20).requires_grad_()
    loss = divergence(name, teacher, student, torch.tensor([1, 1, 1, 0, 1, 1, 1]), temperature=1.5)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert student.grad[3].abs().sum() == 0  # masked row gets no gradient


def test_fkl_matches_seed_kldivloss():
    # The seed computes KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) * T²
    torch.manual_seed(1)
    t, s, T = torch.randn(5, 32), torch.randn(5, 32), 2.0
    seed = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s / T, -1), torch.softmax(t / T, -1)
    ) * T * T
    assert fkl(t, s, temperature=T).item() == pytest.approx(seed.item(), rel=1e-5)


def test_tvd_is_one_minus_acceptance():
    torch.manual_seed(2)
    t, s = torch.randn(4, 9), torch.randn(4, 9)
    p, q = t.softmax(-1), s.softmax(-1)
    alpha = torch.minimum(p, q).sum(-1).mean()
    assert tvd(t, s).item() == pytest.approx(1 - alpha.item(), abs=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match="vocabulary"):
        fkl(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"\[N,V\]"):
        fkl(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="temperature"):
        fkl(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("kl", torch.zeros(2, 5), torch.zeros(2, 5))


def test_cross_entropy():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = torch.tensor([1, -100])
    assert masked_cross_entropy(logits, labels, torch.tensor([1, 0])).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_topk_reconstruction():
    torch.manual_seed(3)
    logits = torch.randn(3, 20)
    values, indices = logits.topk(4, -1)
    dense = topk_to_logits(values, indices, logits.logsumexp(-1), 20)  # log-probs
    exact = logits.log_softmax(-1)
    assert torch.allclose(dense.gather(1, indices), exact.gather(1, indices), atol=1e-6)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(3), atol=1e-5)
    # full cache (k = V) is exact everywhere
    v, i = logits.topk(20, -1)
    assert torch.allclose(topk_to_logits(v, i, logits.logsumexp(-1), 20), exact, atol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("width,k", [(111, 8), (5675, 32), (20, 20)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_teacher_divergence_equals_the_dense_one(name, width, k, temperature):
    """The top-k teacher's divergence without the dense [N,V] teacher: same value and same student
    gradient as divergence() of dense_teacher(), with dropped columns (−1), a mask, k = V (no tail)."""
    torch.manual_seed(width + k)
    n = 7
    logits = torch.randn(n, width) * 3
    values, cols = logits.topk(k, -1)
    top_log_p = values - logits.logsumexp(-1, keepdim=True)
    cols = cols.clone()
    cols[1, 2] = -1  # a top-k id outside the student's columns: its mass is dropped, as densely
    cols[4, 0] = -1
    tail = torch.log((1 - top_log_p.exp().sum(-1)).clamp_min(1e-12) / max(width - k, 1))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    results = []
    for sparse in (True, False):
        student = (torch.randn(n, width, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
        if sparse:
            loss = sparse_teacher_divergence(name, top_log_p, cols, tail, student, mask, temperature=temperature)
        else:
            loss = divergence(name, dense_teacher(top_log_p, cols, tail, width), student, mask, temperature=temperature)
        loss.backward()
        results.append((loss.detach(), student.grad))
    (sparse_loss, sparse_grad), (dense_loss, dense_grad) = results
    assert sparse_loss.item() > 0
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-3, atol=1e-6)


def test_sparse_teacher_divergence_rejects_bad_shapes():
    top, cols, tail, student = torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long), torch.zeros(3), torch.zeros(3, 9)
    with pytest.raises(ValueError, match="top_log_p/top_cols"):
        sparse_teacher_divergence("fkl", top, cols[:, :2], tail, student)
    with pytest.raises(ValueError, match="mask must be"):
        sparse_teacher_divergence("rkl", top, cols, tail, student, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        sparse_teacher_divergence("fkl", top, cols, tail, student, temperature=0.0)
