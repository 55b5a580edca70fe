"""CUDA verify kernels equal the CPU ops (run on a machine with a GPU and a CUDA build).

Float64 sums are block reductions on the GPU and sequential on the CPU, so a token could differ
only when a uniform lands within ~1e-16 of a decision boundary; with these seeds none does.
Every comparison runs with both launch shapes: one block per row (FASTSPEC_CUDA_VERIFY_SPLIT=0)
and the vocabulary split across blocks (auto, and forced to 3 blocks per row position).
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


SPLITS = ["0", "auto", "3"]  # FASTSPEC_CUDA_VERIFY_SPLIT: one block per row, automatic, forced


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("B,gamma,V", [(1, 1, 111), (3, 4, 32128), (8, 8, 49152), (8, 0, 32128)])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cuda_equals_cpu(B, gamma, V, config, split, monkeypatch):
    monkeypatch.setenv("FASTSPEC_CUDA_VERIFY_SPLIT", split)
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


@pytest.mark.parametrize("split", SPLITS)
def test_cuda_bad_inputs(split, monkeypatch):
    monkeypatch.setenv("FASTSPEC_CUDA_VERIFY_SPLIT", split)
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


# ----------------------------------------------------------------------------- statistics on the device
def tv_distance(samples: torch.Tensor, probs: torch.Tensor) -> float:
    hist = torch.bincount(samples.cpu(), minlength=probs.numel()).double() / samples.numel()
    return 0.5 * (hist - probs.double().cpu()).abs().sum().item()


P0 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
P1 = torch.tensor([0.30, 0.10, 0.20, 0.25, 0.15])
Q0 = torch.tensor([0.35, 0.05, 0.40, 0.10, 0.10])  # far from P0: rejections are frequent
Q1 = torch.tensor([0.10, 0.40, 0.10, 0.20, 0.20])


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_emitted_tokens_follow_the_target(deterministic, fused):
    # 200k rows in one call (one block per row): the first emitted token follows p0, the second
    # (after an accepted first draft) follows p1.
    N = 200_000
    g = gen(N)
    q = torch.stack([Q0, Q1]).expand(N, 2, 5).contiguous()  # [N,2,5]
    draft = torch.multinomial(q.reshape(-1, 5), 1, generator=g).reshape(N, 2)
    p = torch.stack([P0, P1, P1]).expand(N, 3, 5).contiguous()  # [N,3,5]
    qq = None if deterministic else q.cuda()
    if fused:
        out, n = ops.fused_verify(p.log().cuda(), draft.cuda(), qq, do_sample=True, generator=g)
    else:
        out, n = ops.verify_sample(p.cuda(), qq, draft.cuda(), generator=g)
    assert tv_distance(out[:, 0], P0) < 0.006
    assert tv_distance(out[n >= 1, 1], P1) < 0.01


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_split_path_emits_the_target_distribution(fused, monkeypatch):
    # The split path (forced: 4 blocks per row position) on V = 5000 with the mass on 5 tokens in
    # different chunks: 64 rows x 400 calls; the first emitted token follows p0 after the
    # residual step, across chunk boundaries.
    monkeypatch.setenv("FASTSPEC_CUDA_VERIFY_SPLIT", "4")
    V, B, calls = 5000, 64, 400
    ids = torch.tensor([3, 1250, 2499, 3760, 4999])
    def spread(small):  # [5] -> [V] with a tiny floor elsewhere
        full = torch.full((V,), 1e-9)
        full[ids] = small
        return full / full.sum()
    p = torch.stack([spread(P0), spread(P1)]).cuda()  # [2,V]
    q0 = spread(Q0).cuda()  # [V]
    g = gen(7)
    counts = torch.zeros(V, dtype=torch.long)
    for _ in range(calls):
        draft = torch.multinomial(q0.cpu().expand(B, V), 1, generator=g).cuda()  # [B,1]
        if fused:
            out, _ = ops.fused_verify(p.log()[None].expand(B, 2, V).contiguous(), draft, q0.expand(B, 1, V).contiguous(),
                                      do_sample=True, generator=g)
        else:
            out, _ = ops.verify_sample(p[None].expand(B, 2, V).contiguous(), q0.expand(B, 1, V).contiguous(), draft,
                                       generator=g)
        counts += torch.bincount(out[:, 0].cpu(), minlength=V)
    observed = counts[ids].double() / counts.sum()
    assert counts.sum() - counts[ids].sum() <= 2  # the 1e-9 floor is (almost) never drawn
    assert 0.5 * (observed - P0.double()).abs().sum().item() < 0.02, observed
