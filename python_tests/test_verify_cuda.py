"""CUDA verify kernels equal the CPU ops (run on a machine with a GPU and a CUDA build).

Float64 sums are block reductions on the GPU and sequential on the CPU, so a token could differ
only when a uniform lands within ~1e-16 of a decision boundary; with these seeds none does.
"""
import pytest
import torch

from fastspec import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_built():
    import fastspec._C as C

    return bool(getattr(C, "with_cuda", False))


@pytest.fixture(autouse=True)
def require_cuda_build():
    if not cuda_built():
        pytest.fail("a CUDA device is present but fastspec._C was built without CUDA")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def case(B, gamma, V, seed):
    g = gen(seed)
    logits = torch.randn(B, gamma + 1, V, generator=g) * 2
    prev = torch.randint(-1, V, (B, 32), generator=g)
    return logits, prev, g


CONFIGS = [
    dict(),
    dict(top_k=50),
    dict(top_p=0.9),
    dict(temperature=0.7, top_k=500, top_p=0.8, repetition_penalty=1.2),
    dict(top_k=1),
]


@pytest.mark.parametrize("B,gamma,V", [(1, 1, 111), (3, 4, 32128), (8, 8, 49152), (8, 0, 32128)])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cuda_equals_cpu(B, gamma, V, config):
    logits, prev, g = case(B, gamma, V, seed=B * V + gamma)
    q = ops.process_logits(logits[:, :gamma] + 0.5 * torch.randn(B, gamma, V, generator=g), prev_tokens=prev,
                           **config)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, gamma) if gamma else torch.zeros(
        B, 0, dtype=torch.long)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    # processing
    p_cpu = ops.process_logits(logits, prev_tokens=prev, draft_tokens=draft, **config)
    p_gpu = ops.process_logits(cuda(logits), prev_tokens=cuda(prev), draft_tokens=cuda(draft), **config)
    assert torch.equal(p_cpu > 0, p_gpu.cpu() > 0)
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-6, atol=1e-9)
    for seed in range(3):
        for qq in (q, None):
            a = ops.fused_verify(logits, draft, qq, prev_tokens=prev, do_sample=True, generator=gen(seed), **config)
            b = ops.fused_verify(cuda(logits), cuda(draft), cuda(qq), prev_tokens=cuda(prev), do_sample=True,
                                 generator=gen(seed), **config)
            assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
            a = ops.verify_sample(p_cpu, qq, draft, generator=gen(seed))
            b = ops.verify_sample(cuda(p_cpu), cuda(qq), cuda(draft), generator=gen(seed))
            assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    rep = config.get("repetition_penalty", 1.0)
    a = ops.fused_verify(logits, draft, prev_tokens=prev, repetition_penalty=rep)
    b = ops.fused_verify(cuda(logits), cuda(draft), prev_tokens=cuda(prev), repetition_penalty=rep)
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    a = ops.verify_greedy(logits, draft)
    b = ops.verify_greedy(cuda(logits), cuda(draft))
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


def test_cuda_bad_inputs():
    logits, prev, _ = case(2, 3, 50, seed=0)
    draft = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.fused_verify(logits.cuda(), draft)  # draft on the CPU
    with pytest.raises((ValueError, RuntimeError), match="outside"):
        ops.fused_verify(logits.cuda(), draft.cuda().fill_(50))
    bad = logits.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises((ValueError, RuntimeError), match="NaN"):
        ops.fused_verify(bad.cuda(), draft.cuda(), do_sample=True)
    p = torch.softmax(logits, -1) * 1.1
    with pytest.raises((ValueError, RuntimeError), match="sum to 1"):
        ops.verify_sample(p.cuda(), None, draft.cuda())
