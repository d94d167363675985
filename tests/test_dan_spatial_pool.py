"""dan_spatial_pool on every fast backend against the fp64 reference: values, gradients, strides,
gradcheck, opcheck, torch.compile and argument errors."""
import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels import _backend, reference
from tests.utils import TOL, backend_params, dtypes_for, interpreted

OP = "dan_spatial_pool"
PARAMS = backend_params(OP)

# (B, M, C, C2, H, W)
PAPER = (2, 4, 512, 512, 7, 7)
SHAPES = [
    (1, 1, 5, 3, 1, 1),  # B = 1, one head, H = W = 1
    (3, 1, 9, 7, 5, 3),  # one head, odd C and C2
    (2, 3, 33, 17, 6, 9),  # P = 54: more than one tile of 32 positions
    (2, 2, 3, 5, 2, 3),
]
TINY = [SHAPES[0], SHAPES[3]]  # for the Triton interpreter


def shapes_for(device, backend):
    return TINY if interpreted(device, backend) else [PAPER] + SHAPES


def make_inputs(shape, dtype, device, seed=0):
    B, M, C, C2, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen)
    z = torch.randn(B, M, C2, H, W, generator=gen)
    return x.to(device=device, dtype=dtype), z.to(device=device, dtype=dtype)


def op_for(device, backend):
    # "cuda" on CPU tensors: the emulated CUDA build
    return getattr(torch.ops.apkernels, OP + _backend.op_suffix(backend, torch.device(device)))


def backward_op_for(device, backend):
    return getattr(torch.ops.apkernels, OP + "_backward" + _backend.op_suffix(backend, torch.device(device)))


def assert_close_scaled(actual, expected, bound, dtype):
    """actual vs the fp64 expected, with the absolute tolerance scaled by `bound` (the same sums over
    absolute values): a sum of many terms may cancel to ~0, its rounding error does not."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), atol=atol * max(bound, 1.0), rtol=rtol)


def expected_forward(x, z):
    x64, z64 = x.double(), z.double()
    return reference.dan_spatial_pool(x64, z64)[0], reference.dan_spatial_pool(x64.abs(), z64)[0].max().item()


def attention_maps(z):
    """The attention maps s [B, M, H*W] the forward saves, in fp64."""
    return reference.dan_spatial_attention(z.double()).flatten(2)


def expected_backward(gg, x, z):
    gg64, x64, z64 = gg.double(), x.double(), z.double()
    s64 = attention_maps(z)
    gx, gz = reference.dan_spatial_pool_backward(gg64, x64, z64, s64)
    bx, bz = reference.dan_spatial_pool_backward(gg64.abs(), x64.abs(), z64, s64)
    return gx, gz, bx.max().item(), bz.max().item()


@pytest.mark.parametrize("device,backend", PARAMS)
def test_values_and_gradients_match_reference(device, backend):
    for dtype in dtypes_for(backend):
        for shape in shapes_for(device, backend):
            x, z = make_inputs(shape, dtype, device)
            x.requires_grad_(True)
            z.requires_grad_(True)
            g = apkernels.dan_spatial_pool(x, z, backend=backend)
            assert g.shape == (shape[0], shape[1], shape[2]) and g.dtype == dtype and g.device == x.device
            expect, bound = expected_forward(x.detach(), z.detach())
            assert_close_scaled(g, expect, bound, dtype)
            # The saved attention maps: the accumulation dtype, [B, M, H*W], sums of relu(z).
            _, s = op_for(device, backend)(x.detach(), z.detach())
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert s.shape == (shape[0], shape[1], shape[4] * shape[5]) and s.dtype == acc and s.is_contiguous()
            expect_s = attention_maps(z.detach())
            assert_close_scaled(s, expect_s, expect_s.max().item(), acc)

            gg = torch.randn(g.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
            g.backward(gg)
            gx, gz, bx, bz = expected_backward(gg, x.detach(), z.detach())
            assert_close_scaled(x.grad, gx, bx, dtype)
            assert_close_scaled(z.grad, gz, bz, dtype)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_strided_inputs_and_grads(device, backend):
    B, M, C, C2, H, W = (2, 3, 6, 5, 3, 4) if interpreted(device, backend) else (2, 3, 20, 11, 5, 6)
    gen = torch.Generator().manual_seed(3)
    for dtype in dtypes_for(backend):
        base_x = torch.randn(B, C, W, H, generator=gen).to(device=device, dtype=dtype)
        base_z = torch.randn(B, C2 * 2, M, H, W, generator=gen).to(device=device, dtype=dtype)
        views = [
            (base_x.transpose(2, 3), base_z[:, ::2].transpose(1, 2)),  # H/W transposed, z strided and permuted
            (base_x.transpose(2, 3).contiguous(memory_format=torch.channels_last), base_z[:, 1::2].transpose(1, 2)),
        ]
        for x, z in views:
            assert not x.is_contiguous() and not z.is_contiguous()
            expect, bound = expected_forward(x, z)
            assert_close_scaled(apkernels.dan_spatial_pool(x, z, backend=backend), expect, bound, dtype)
            _, s = op_for(device, backend)(x, z)
            # A stride-0 (expanded) and a transposed grad_g, as autograd may hand them over.
            for gg in (torch.ones(1, 1, 1, device=device, dtype=dtype).expand(B, M, C),
                       torch.randn(B, C, M, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)):
                gx, gz = backward_op_for(device, backend)(gg, x, z, s)
                ex, ez, bx, bz = expected_backward(gg, x, z)
                assert gx.is_contiguous() and gz.is_contiguous()
                assert_close_scaled(gx, ex, bx, dtype)
                assert_close_scaled(gz, ez, bz, dtype)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_deterministic(device, backend):
    shape = TINY[1] if interpreted(device, backend) else PAPER
    x, z = make_inputs(shape, torch.float32, device, seed=5)
    gg = torch.randn(shape[0], shape[1], shape[2], device=device)
    g, s = op_for(device, backend)(x, z)
    first = (g, s, *backward_op_for(device, backend)(gg, x, z, s))
    g, s = op_for(device, backend)(x, z)
    second = (g, s, *backward_op_for(device, backend)(gg, x, z, s))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_relu_edges_on_the_cpu_kernel():
    """relu keeps NaN (as torch.relu does) and zero z gets no gradient (1[z > 0])."""
    if "cpu" not in apkernels.available_backends(OP, "cpu"):
        pytest.skip("no compiled CPU kernel")
    x = torch.ones(1, 2, 1, 3)
    z = torch.tensor([[[[[0.0, -1.0, float("nan")]], [[2.0, 0.0, 1.0]]]]])  # [1, 1, 2, 1, 3]
    g = apkernels.dan_spatial_pool(x, z, backend="cpu")
    expect_g, expect_s = reference.dan_spatial_pool(x, z)
    torch.testing.assert_close(g, expect_g, equal_nan=True)
    _, s = torch.ops.apkernels.dan_spatial_pool(x, z)
    torch.testing.assert_close(s, expect_s, equal_nan=True)
    gx, gz = torch.ops.apkernels.dan_spatial_pool_backward(torch.ones(1, 1, 2), x, z, s)
    ex, ez = reference.dan_spatial_pool_backward(torch.ones(1, 1, 2), x, z, expect_s)
    torch.testing.assert_close(gx, ex, equal_nan=True)
    torch.testing.assert_close(gz, ez, equal_nan=True)


def away_from_zero(t, gen):
    """Values with |v| >= 0.2, so that the finite differences of gradcheck never cross relu's kink."""
    return (torch.rand(t.shape, generator=gen, dtype=t.dtype) * 0.8 + 0.2) * t.sign().where(t != 0, 1.0)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_gradcheck_fp64(device, backend):
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"{backend} has no fp64 kernels")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=gen)
    z = away_from_zero(torch.randn(2, 2, 4, 2, 3, dtype=torch.float64, generator=gen), gen)
    x, z = x.to(device).requires_grad_(), z.to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: apkernels.dan_spatial_pool(a, b, backend=backend), (x, z))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_opcheck(device, backend):
    x, z = make_inputs((2, 2, 5, 3, 2, 3), torch.float32, device, seed=9)
    gg = torch.randn(2, 2, 5, device=device)
    opcheck(op_for(device, backend).default, (x.requires_grad_(), z.requires_grad_()))
    _, s = op_for(device, backend)(x.detach(), z.detach())
    opcheck(backward_op_for(device, backend).default, (gg, x.detach(), z.detach(), s))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_compile_fullgraph(device, backend):
    x, z = make_inputs((2, 3, 6, 4, 3, 3), torch.float32, device, seed=11)
    x.requires_grad_(True)
    z.requires_grad_(True)
    gg = torch.randn(2, 3, 6, device=device)

    def f(a, b):
        return apkernels.dan_spatial_pool(a, b, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, z)
    grads = torch.autograd.grad(out, (x, z), gg)
    expect = f(x, z)
    grads_eager = torch.autograd.grad(expect, (x, z), gg)
    torch.testing.assert_close(out, expect)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_bad_arguments(device, backend):
    x, z = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 2, 5, 3, 3, device=device)
    cases = [
        ((x[0], z), "x must be 4-D"),
        ((x, z[0]), "z must be 5-D"),
        ((x, z[:, :, :, :2]), "z must have shape"),
        ((x[:1], z), "z must have shape"),
        ((x, z.double()), "z must have the same dtype"),
        ((x.int(), z.int()), "x must be a floating-point"),
        ((x[:, :0], z), "x must not be empty"),
        ((x, z[:, :0]), "z must not be empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            apkernels.dan_spatial_pool(*args, backend=backend)
        if backend in ("cpu", "cuda"):  # the compiled kernels check direct op calls too
            with pytest.raises(ValueError, match=message):
                op_for(device, backend)(*args)
    if backend in ("cpu", "cuda"):
        s = torch.ones(2, 2, 9, device=device)
        with pytest.raises(ValueError, match="grad_g must have shape"):
            backward_op_for(device, backend)(torch.randn(2, 2, 3, device=device), x, z, s)
        with pytest.raises(ValueError, match="grad_g must have the same dtype"):
            backward_op_for(device, backend)(torch.randn(2, 2, 4, device=device).double(), x, z, s)
    if backend in ("cpu", "cuda", "triton"):  # the saved attention maps the backward reads
        gg = torch.randn(2, 2, 4, device=device)
        for bad, message in ((torch.ones(2, 2, 8, device=device), "s must"),
                             (torch.ones(2, 2, 9, device=device, dtype=torch.float64), "s must"),
                             (torch.ones(2, 9, 2, device=device).transpose(1, 2), "s must")):
            with pytest.raises(ValueError, match=message):
                backward_op_for(device, backend)(gg, x, z, bad)
