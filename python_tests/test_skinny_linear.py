"""fastspec.ops.skinny_linear (native vs its PyTorch reference, bit for bit) and its use on the
target's linears inside fastspec.generate (lossless against the target's own greedy decoding)."""
import copy

import pytest
import torch

import fastspec
from fastspec import ops
from fastspec import skinny_linear as skinny_linear_module
from fastspec.skinny_linear import MAX_ROWS, SkinnyLinear, skinny_linears, takes_kernel

native = pytest.mark.skipif(not ops.native_available(), reason="fastspec._C not built")


def _inputs(m, k, n, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


@native
@pytest.mark.parametrize("n", [111, 32128, 49152])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_native_equals_reference_bit_for_bit(m, n):
    for k, bias in ((7, True), (64, False), (577, True)):
        x, w, b = _inputs(m, k, n, seed=m + k, bias=bias)
        got = ops.skinny_linear(x, w, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert torch.equal(got, ops.reference.skinny_linear(x, w, b)), (m, k, n)


@native
@pytest.mark.parametrize("m", [9, 11, 16])
def test_more_rows_than_one_pass_still_exact(m):
    x, w, b = _inputs(m, 203, 111, seed=m)
    assert torch.equal(ops.skinny_linear(x, w, b), ops.reference.skinny_linear(x, w, b))


@pytest.mark.parametrize("m", [1, 3, 8, 11])
def test_a_row_does_not_depend_on_the_rows_beside_it(m):
    x, w, b = _inputs(m, 577, 111, seed=3)
    together = ops.skinny_linear(x, w, b)
    for i in range(m):
        assert torch.equal(together[i : i + 1], ops.skinny_linear(x[i : i + 1], w, b)), i


def test_close_to_torch_linear_and_handles_views():
    x, w, b = _inputs(8, 576, 1536, seed=5)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    torch.testing.assert_close(ops.skinny_linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    wide = torch.randn(576, 16)  # a transposed (non-contiguous) view of x's shape
    torch.testing.assert_close(ops.skinny_linear(wide.t(), w), torch.nn.functional.linear(wide.t(), w),
                               rtol=1e-5, atol=1e-5)
    assert ops.skinny_linear(torch.empty(0, 576), w, b).shape == (0, 1536)


@pytest.mark.parametrize("fn", [ops.skinny_linear, ops.reference.skinny_linear])
def test_bad_inputs_raise_value_errors(fn):
    x, w, b = _inputs(3, 16, 111)
    cases = [
        ((x.double(), w, b), "x must be float32"),
        ((x, w.bfloat16(), b), "weight must be float32"),
        ((x[0], w, b), "x must have rank 2"),
        ((x, w[:, :5], b), "last dims must match"),
        ((x, w, b[:3]), "bias has 3 entries"),
        ((x, w, b[None]), "bias must have rank 1"),
        ((x.tolist(), w, b), "x must be a torch.Tensor"),
        ((x, w.to("meta"), b), "same device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(*args)


@native
def test_native_op_checks_its_own_arguments():
    x, w, b = _inputs(3, 16, 111)
    with pytest.raises(ValueError, match="x must be float32"):
        torch.ops.fastspec.skinny_linear(x.double(), w, b)
    with pytest.raises(ValueError, match="their last dims must match"):
        torch.ops.fastspec.skinny_linear(x, w[:, :3], b)
    with pytest.raises(ValueError, match="bias must be a float32 CPU vector of 111"):
        torch.ops.fastspec.skinny_linear(x, w, b[:2])


def test_which_calls_take_the_kernel():
    w = torch.randn(7, 5)
    assert takes_kernel(torch.randn(3, 8, 5), w)  # 24 rows
    assert not takes_kernel(torch.randn(5, 5, 5), w)  # 25 rows: BLAS
    assert not takes_kernel(torch.randn(2, 5).bfloat16(), w)
    assert not takes_kernel(torch.randn(2, 5), w.double())
    assert not takes_kernel(torch.randn(2, 5, requires_grad=True), w)  # autograd: nn.Linear
    with torch.no_grad():
        assert takes_kernel(torch.randn(2, 5, requires_grad=True), w)


@native
def test_swap_is_scoped_and_outputs_match_the_kernel(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4, bias=False))
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), skinny_linears(model) as swapped:
        assert swapped == 2 and type(model[0]) is SkinnyLinear
        got = model(x)
    assert type(model[0]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    hidden = ops.skinny_linear(x.reshape(6, 16), model[0].weight, model[0].bias).relu()
    assert torch.equal(got, ops.skinny_linear(hidden, model[2].weight).reshape(2, 3, 4))
    with pytest.raises(RuntimeError, match="boom"), skinny_linears(model):
        raise RuntimeError("boom")
    assert type(model[0]) is torch.nn.Linear  # restored after an error too
    with skinny_linears(model, enabled=False) as swapped:
        assert swapped == 0
    monkeypatch.setenv("FASTSPEC_SKINNY_LINEAR", "0")
    with skinny_linears(model) as swapped:
        assert swapped == 0
    with skinny_linears(model.double()) as swapped:
        assert swapped == 0  # float64 weights keep nn.Linear


@native
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_t5"])
def test_generate_uses_the_kernel_and_stays_lossless(name, request, monkeypatch, llama_inputs, t5_inputs):
    from fastspec.drafters import PromptLookupDrafter

    model = request.getfixturevalue(name)
    ids, mask = (llama_inputs if name == "tiny_llama" else t5_inputs)
    ids, mask = ids[:3], mask[:3]
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    calls = []
    real = skinny_linear_module._KERNEL
    monkeypatch.setattr(skinny_linear_module, "_KERNEL", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for gamma in (1, 4):
        out = fastspec.generate(model, PromptLookupDrafter(max_n=2), ids, mask, gamma=gamma, max_new_tokens=12)
        assert torch.equal(out.sequences, reference), gamma
    assert calls and max(calls) <= MAX_ROWS
    assert all(type(m) is not SkinnyLinear for m in model.modules())
    calls.clear()
    off = fastspec.generate(model, None, ids, mask, max_new_tokens=12, skinny_linear=False)
    assert not calls and torch.equal(off.sequences, reference)


@native
def test_to_skinny_is_permanent_and_trains_like_nn_linear():
    """fastspec's own drafters keep SkinnyLinear modules: few-row inference takes the kernel, and
    autograd falls back to nn.Linear with the same gradients."""
    from fastspec.skinny_linear import to_skinny

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    skinny = copy.deepcopy(plain)
    assert len(to_skinny(skinny)) == 2 and type(skinny[0]) is SkinnyLinear
    x = torch.randn(4, 16)
    for model in (plain, skinny):
        model(x).square().sum().backward()
    for a, b in zip(plain.parameters(), skinny.parameters()):
        assert torch.equal(a.grad, b.grad)
    with torch.no_grad():
        hidden = ops.skinny_linear(x, skinny[0].weight, skinny[0].bias).tanh()
        assert torch.equal(skinny(x), ops.skinny_linear(hidden, skinny[2].weight, skinny[2].bias))


@native
def test_feature_drafter_layers_take_the_kernel(tiny_llama):
    from fastspec.drafters import FeatureDrafter

    drafter = FeatureDrafter.from_target(tiny_llama)
    linears = [m for m in drafter.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is SkinnyLinear for m in linears)
