"""dan_head_fusion on every fast backend against the fp64 reference: values, gradients, strides,
gradcheck, opcheck, torch.compile and argument errors."""
import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels import _backend, reference
from tests.utils import TOL, backend_params, dtypes_for, interpreted

OP = "dan_head_fusion"
PARAMS = backend_params(OP)

# (B, M, C)
PAPER = (2, 4, 512)
SHAPES = [
    (1, 1, 7),  # B = 1, one head: no log-softmax
    (3, 1, 33),
    (3, 2, 33),  # odd C
    (5, 3, 1),  # C = 1
    (2, 5, 70),  # C beyond one channel block of the CPU kernel
]
TINY = [SHAPES[0], SHAPES[2]]


def shapes_for(device, backend):
    return TINY if interpreted(device, backend) else [PAPER] + SHAPES


def make_inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) * 3
    a = torch.randn(shape, generator=gen) * 3
    return g.to(device=device, dtype=dtype), a.to(device=device, dtype=dtype)


def op_for(device, backend, backward=False):
    suffix = _backend.op_suffix(backend, torch.device(device))  # "cuda" on CPU tensors: the emulated build
    return getattr(torch.ops.apkernels, OP + ("_backward" if backward else "") + suffix)


def assert_close_scaled(actual, expected, dtype):
    """actual vs the fp64 expected; the absolute tolerance scales with the largest magnitude (the
    log-softmax subtracts a logsumexp of that size from every head)."""
    atol, rtol = TOL[dtype]
    bound = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), atol=atol * bound, rtol=rtol)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_values_and_gradients_match_reference(device, backend):
    for dtype in dtypes_for(backend):
        for shape in shapes_for(device, backend):
            g, a = make_inputs(shape, dtype, device)
            g.requires_grad_(True)
            a.requires_grad_(True)
            fused, heads = apkernels.dan_head_fusion(g, a, backend=backend)
            assert fused.shape == (shape[0], shape[2]) and heads.shape == shape
            assert fused.dtype == dtype and heads.dtype == dtype
            ef, eh = reference.dan_head_fusion(g.detach().double(), a.detach().double())
            assert_close_scaled(fused, ef, dtype)
            assert_close_scaled(heads, eh, dtype)
            if shape[1] == 1:  # one head: heads are exactly the gated features
                torch.testing.assert_close(heads.double().cpu(), (g * torch.sigmoid(a)).detach().double().cpu(),
                                           atol=TOL[dtype][0] * 10, rtol=TOL[dtype][1])

            gen = torch.Generator().manual_seed(1)
            gf = torch.randn(fused.shape, generator=gen).to(device=device, dtype=dtype)
            gh = torch.randn(heads.shape, generator=gen).to(device=device, dtype=dtype)
            torch.autograd.backward((fused, heads), (gf, gh))
            dg, da = reference.dan_head_fusion_backward(gf.double(), gh.double(), g.detach().double(),
                                                        a.detach().double(), eh)
            assert_close_scaled(g.grad, dg, dtype)
            assert_close_scaled(a.grad, da, dtype)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_strided_inputs_and_grads(device, backend):
    B, M, C = (2, 3, 5) if interpreted(device, backend) else (3, 4, 37)
    gen = torch.Generator().manual_seed(3)
    for dtype in dtypes_for(backend):
        g = torch.randn(B, C, M, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)  # channel stride M
        a = torch.randn(M, B, 2 * C, generator=gen).to(device=device, dtype=dtype).transpose(0, 1)[:, :, ::2]
        assert not g.is_contiguous() and not a.is_contiguous()
        fused, heads = op_for(device, backend)(g, a)
        ef, eh = reference.dan_head_fusion(g.double(), a.double())
        assert_close_scaled(fused, ef, dtype)
        assert_close_scaled(heads, eh, dtype)
        # fused.sum() hands over a stride-0 grad_fused; heads a transposed grad.
        gf = torch.ones(1, 1, device=device, dtype=dtype).expand(B, C)
        gh = torch.randn(B, C, M, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        dg, da = op_for(device, backend, backward=True)(gf, gh, g, a, heads)
        edg, eda = reference.dan_head_fusion_backward(gf.double(), gh.double(), g.double(), a.double(), eh)
        assert dg.is_contiguous() and da.is_contiguous()
        assert_close_scaled(dg, edg, dtype)
        assert_close_scaled(da, eda, dtype)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_extreme_logits(device, backend):
    """Saturated sigmoids and heads far apart: no overflow, matches the reference."""
    g = torch.tensor([[[50.0, -50.0, 0.0, 1.0], [-50.0, 50.0, 0.0, 1.0]]], device=device)
    a = torch.tensor([[[100.0, -100.0, 30.0, -30.0], [-100.0, 100.0, -30.0, 30.0]]], device=device)
    fused, heads = op_for(device, backend)(g, a)
    ef, eh = reference.dan_head_fusion(g.double(), a.double())
    assert torch.isfinite(heads).all()
    assert_close_scaled(fused, ef, torch.float32)
    assert_close_scaled(heads, eh, torch.float32)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_non_finite_heads_follow_torch_log_softmax(device, backend):
    """A +inf head makes every head of its column NaN (torch subtracts the max, inf - inf = NaN),
    wherever the +inf stands among the heads; a -inf head is just -inf; a NaN head spreads NaN."""
    inf, nan = float("inf"), float("nan")
    g = torch.tensor([[[inf, 1.0, -inf, nan, 2.0], [0.5, inf, 1.0, 0.0, -inf], [1.0, 2.0, 0.0, 1.0, 0.0]]],
                     device=device)
    a = torch.zeros_like(g)
    fused, heads = op_for(device, backend)(g, a)
    ef, eh = reference.dan_head_fusion(g, a)
    torch.testing.assert_close(heads, eh, equal_nan=True)
    torch.testing.assert_close(fused, ef, equal_nan=True)
    assert heads[0, :, :2].isnan().all() and heads[0, :, 3].isnan().all()
    assert heads[0, 0, 2] == -inf and heads[0, 2, 4] != -inf


@pytest.mark.parametrize("device,backend", PARAMS)
def test_deterministic(device, backend):
    shape = TINY[1] if interpreted(device, backend) else (8, 4, 512)
    g, a = make_inputs(shape, torch.float32, device, seed=5)
    gf = torch.randn(shape[0], shape[2], device=device)
    gh = torch.randn(shape, device=device)
    f1, h1 = op_for(device, backend)(g, a)
    f2, h2 = op_for(device, backend)(g, a)
    assert torch.equal(f1, f2) and torch.equal(h1, h2)
    b1 = op_for(device, backend, backward=True)(gf, gh, g, a, h1)
    b2 = op_for(device, backend, backward=True)(gf, gh, g, a, h1)
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("heads", [1, 3])
def test_gradcheck_fp64(device, backend, heads):
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"{backend} has no fp64 kernels")
    g, a = make_inputs((2, heads, 5), torch.float64, device, seed=7)
    g.requires_grad_(True)
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: apkernels.dan_head_fusion(x, y, backend=backend), (g, a))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_opcheck(device, backend):
    g, a = make_inputs((2, 3, 6), torch.float32, device, seed=9)
    fused, heads = op_for(device, backend)(g, a)
    opcheck(op_for(device, backend).default, (g.requires_grad_(), a.requires_grad_()))
    opcheck(op_for(device, backend, backward=True).default,
            (torch.randn_like(fused), torch.randn_like(heads), g.detach(), a.detach(), heads))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_compile_fullgraph(device, backend):
    g, a = make_inputs((2, 3, 6), torch.float32, device, seed=11)
    g.requires_grad_(True)
    a.requires_grad_(True)
    gf, gh = torch.randn(2, 6, device=device), torch.randn(2, 3, 6, device=device)

    def f(x, y):
        return apkernels.dan_head_fusion(x, y, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(g, a)
    grads = torch.autograd.grad(out, (g, a), (gf, gh))
    expect = f(g, a)
    grads_eager = torch.autograd.grad(expect, (g, a), (gf, gh))
    for x, y in zip(out + grads, expect + grads_eager):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_bad_arguments(device, backend):
    g, a = torch.randn(2, 4, 3, device=device), torch.randn(2, 4, 3, device=device)
    cases = [
        ((g[0], a[0]), "g must be 3-D"),
        ((g, a[:, :, :2]), "gate_logits must have the shape"),
        ((g, a.double()), "gate_logits must have the same dtype"),
        ((g.int(), a.int()), "g must be a floating-point"),
        ((g[:, :0], a[:, :0]), "g must not be empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            apkernels.dan_head_fusion(*args, backend=backend)
        if backend in ("cpu", "cuda"):  # the compiled kernels check direct op calls too
            with pytest.raises(ValueError, match=message):
                op_for(device, backend)(*args)
    if backend in ("cpu", "cuda"):
        bwd = op_for(device, backend, backward=True)
        with pytest.raises(ValueError, match="grad_fused must have shape"):
            bwd(torch.randn(2, 4, device=device), g, g, a, g)
        with pytest.raises(ValueError, match="grad_heads must have the shape"):
            bwd(torch.randn(2, 3, device=device), g[:, :2], g, a, g)
        with pytest.raises(ValueError, match="heads must have the same dtype"):
            bwd(torch.randn(2, 3, device=device), g, g, a, g.double())
