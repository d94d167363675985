"""The Triton backend (`apkernels::<op>_triton`) against the reference, op by op.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes stay small and each case is one launch where it can be.
With a GPU the same tests run on CUDA tensors.
"""

import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels import _backend, reference
from tests.test_api import op_samples
from tests.utils import TOL, small_ints
from tests.utils import run_python_compiled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = apkernels.OPS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

pytestmark = pytest.mark.skipif(
    not all(apkernels._backend.available(op, "triton", DEVICE) for op in OPS),
    reason=f"Triton backend unavailable here ({_backend.TRITON_IMPORT_ERROR or 'no GPU and TRITON_INTERPRET unset'})",
)


def assert_identical(actual, expected):
    """Bit-identical values, NaN included (torch.equal treats NaN as unequal)."""
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def test_every_op_registered():
    assert set(OPS) <= _backend.TRITON_OPS
    for name in apkernels._library.SCHEMAS:
        for key in ("CPU", "CUDA"):
            assert apkernels._library.has_kernel(name + "_triton", key), (name, key)


# --- patch_pool ---------------------------------------------------------------------------------


def check_patch_pool(x, keep, pos, score):
    tokens, index = apkernels.patch_pool(x, keep, pos, score=score, backend="triton")
    ref_tokens, ref_index = reference.patch_pool(x, keep, pos, score)
    assert torch.equal(index, ref_index), (index, ref_index)
    assert_identical(tokens, ref_tokens)  # a gather (+ one rounded add): bit-identical
    return tokens, index


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("score", reference.PATCH_SCORES)
def test_patch_pool_scores_ties_dtypes(score, dtype):
    # odd C, N = 15 (not a power of two), integer values: many exact ties, every score exact
    x = small_ints(2, 5, 3, 5, dtype=dtype, device=DEVICE)
    pos = torch.randn(15, 5, device=DEVICE).to(dtype)
    check_patch_pool(x, 7, pos, score)


def patch_pool_input(shape, layout):
    """Small-integer x of `shape` [B, C, H, W]: contiguous, channels_last, or "sliced" (a strided
    view with every stride non-trivial)."""
    B, C, H, W = shape
    if layout == "sliced":
        return small_ints(B, 2 * C, H, 2 * W + 1, device=DEVICE)[:, ::2, :, 1::2]
    x = small_ints(*shape, device=DEVICE)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize(
    "shape,keep,layout",
    [
        ((1, 3, 2, 3), 1, "contiguous"),  # B = 1, keep = 1
        ((2, 4, 3, 3), 9, "contiguous"),  # keep = N: identity order
        ((2, 3, 1, 1), 1, "contiguous"),  # H = W = 1
        ((2, 6, 3, 4), 5, "channels_last"),
        ((2, 6, 3, 4), 5, "sliced"),  # every stride non-trivial
    ],
)
def test_patch_pool_shapes_and_layouts(shape, keep, layout):
    B, C, H, W = shape
    x = patch_pool_input(shape, layout)
    pos = torch.randn(1, H * W, C, device=DEVICE)
    check_patch_pool(x, keep, pos if keep > 1 else None, "sum_abs")


@pytest.mark.parametrize("score", ["sum", "max"])
def test_patch_pool_nan_inf_signed_zero(score):
    x = small_ints(2, 3, 2, 4, device=DEVICE)
    x[0, :, 0, 1] = 0.0
    x[0, 1, 0, 2] = -0.0
    x[0, :, 0, 2] = -0.0
    x[0, 2, 1, 1] = float("nan")
    x[0, 0, 1, 3] = float("inf")
    x[1, 1, 0, 0] = float("-inf")
    x[1, 2, 1, 2] = float("nan")
    x[1, 0, 1, 0] = float("inf")
    check_patch_pool(x, 5, None, score)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patch_pool_gradients(dtype):
    x = torch.randn(2, 5, 3, 3, device=DEVICE).to(dtype).requires_grad_()
    pos = torch.randn(1, 9, 5, device=DEVICE).to(dtype).requires_grad_()
    tokens, _ = apkernels.patch_pool(x, 4, pos, backend="triton")
    ref_tokens, _ = reference.patch_pool(x, 4, pos, "sum_abs")
    grad = torch.randn_like(tokens)
    gx, gp = torch.autograd.grad(tokens, (x, pos), grad)
    rx, rp = torch.autograd.grad(ref_tokens, (x, pos), grad)
    assert torch.equal(gx, rx)  # a scatter: exact
    assert_close(gp, rp, dtype)  # a batch sum


@pytest.mark.parametrize(
    "shape,keep,layout",
    [
        ((2, 5, 7, 9), 20, "contiguous"),  # N = 63: four tiles of 16, the last one partial
        ((1, 3, 6, 6), 1, "contiguous"),  # B = 1, keep = 1
        ((2, 4, 5, 7), 35, "channels_last"),  # keep = N
        ((2, 6, 4, 5), 9, "sliced"),  # every stride non-trivial
    ],
)
def test_patch_pool_tiled_selection(monkeypatch, shape, keep, layout):
    """Maps beyond ROW_POSITIONS take the tiled kernel (keys in a workspace, radix select): forced
    here at small sizes with 16-position tiles; integer values tie everywhere, plus NaN / inf /
    signed zeros, so every score must pick exactly the reference's positions."""
    from apkernels.triton_kernels import patch_pool as triton_patch_pool

    monkeypatch.setattr(triton_patch_pool, "ROW_POSITIONS", 1)
    monkeypatch.setattr(triton_patch_pool, "TILE_POSITIONS", 16)
    B, C, H, W = shape
    x = patch_pool_input(shape, layout)
    if layout == "contiguous" and keep > 1:
        x[0, :, 0, 1] = -0.0
        x[0, 1, 1, 2] = float("nan")
        x[-1, 0, 2, 0] = float("inf")
        x[-1, 2, 0, 3] = float("-inf")
    pos = torch.randn(1, H * W, C, device=DEVICE)
    for score in reference.PATCH_SCORES:
        check_patch_pool(x, keep, pos, score)


def test_patch_pool_rejects_float64_and_cpu_without_interpreter(monkeypatch):
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="x must be one of float16, bfloat16, float32"):
        torch.ops.apkernels.patch_pool_triton(x, 2, None, "sum")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        torch.ops.apkernels.patch_pool_triton(torch.randn(1, 2, 2, 2), 2, None, "sum")


# --- token_pool ---------------------------------------------------------------------------------


def qkv_views(B, N, heads, head_dim, dtype, low=-2, high=3):
    """q, k as the attention block makes them: strided views of one [B, N, 3, heads, head_dim]."""
    qkv = small_ints(B, N, 3, heads, head_dim, dtype=dtype, device=DEVICE, low=low, high=high)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


def check_token_pool(x, q, k, keep, scale, score):
    tokens, index = apkernels.token_pool(x, q, k, keep, scale=scale, score=score, backend="triton")
    ref_tokens, ref_index = reference.token_pool(x, q, k, keep, scale, score)
    assert torch.equal(index, ref_index), (index, ref_index)
    assert_identical(tokens, ref_tokens)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("score", reference.TOKEN_SCORES)
def test_token_pool_scores_ties_dtypes(score, dtype):
    q, k = qkv_views(2, 10, 3, 5, dtype)
    x = torch.randn(2, 10, 15, device=DEVICE).to(dtype)
    check_token_pool(x, q, k, 4, 0.5, score)


@pytest.mark.parametrize(
    "B,N,heads,head_dim,keep",
    [(1, 2, 1, 1, 1), (2, 7, 2, 3, 6), (1, 18, 1, 4, 1)],  # N = 2; keep = N - 1; N - 1 = 17
)
def test_token_pool_shapes(B, N, heads, head_dim, keep):
    q, k = qkv_views(B, N, heads, head_dim, torch.float32)
    x = torch.randn(B, N, 2 * heads * head_dim + 1, device=DEVICE)[:, :, 1::2]  # strided x
    check_token_pool(x, q, k, keep, head_dim**-0.5, "sum")


@pytest.mark.parametrize(
    "B,N,heads,head_dim,keep",
    [(2, 40, 3, 5, 17), (1, 24, 2, 3, 1), (2, 19, 1, 4, 18)],  # 39 tokens in 3 tiles; keep = 1; keep = N - 1
)
def test_token_pool_tiled_selection(monkeypatch, B, N, heads, head_dim, keep):
    """More than ROW_TOKENS patch tokens take the tiled kernel (keys in a workspace, radix select):
    forced here with 16-token tiles; integer q/k tie everywhere, so every score must pick exactly
    the reference's tokens."""
    from apkernels.triton_kernels import token_pool as triton_token_pool

    monkeypatch.setattr(triton_token_pool, "ROW_TOKENS", 1)
    monkeypatch.setattr(triton_token_pool, "TILE_TOKENS", 16)
    q, k = qkv_views(B, N, heads, head_dim, torch.float32)
    k = k.clone()
    k[0, 0, 3, 0] = float("nan")
    k[-1, -1, 5, :] = float("inf")
    x = torch.randn(B, N, 2 * heads * head_dim + 1, device=DEVICE)[:, :, 1::2]  # strided x
    for score in reference.TOKEN_SCORES:
        check_token_pool(x, q, k, keep, 0.5, score)


def test_token_pool_x_dtype_differs_from_qk_and_contiguous_qk():
    q, k = qkv_views(2, 9, 2, 4, torch.bfloat16)
    x = torch.randn(2, 9, 8, device=DEVICE)
    check_token_pool(x, q.contiguous(), k.contiguous(), 3, 0.25, "sum_abs")


@pytest.mark.parametrize("score", ["sum", "max"])
def test_token_pool_nan_inf(score):
    q, k = qkv_views(2, 9, 2, 3, torch.float32)
    q = q.clone()
    k = k.clone()
    q[:, :, 0] = q[:, :, 0].abs() + 1  # positive CLS query: inf keys give inf logits
    k[0, 0, 3, 1] = float("nan")
    k[0, 1, 5, :] = float("inf")
    k[1, 1, 2, :] = float("-inf")
    k[1, 0, 7, 0] = float("nan")
    x = torch.randn(2, 9, 6, device=DEVICE)
    check_token_pool(x, q, k, 4, 0.5, score)


def test_token_pool_gradient():
    q, k = qkv_views(2, 8, 2, 3, torch.float32)
    x = torch.randn(2, 8, 6, device=DEVICE, requires_grad=True)
    tokens, _ = apkernels.token_pool(x, q, k, 3, scale=0.5, backend="triton")
    ref_tokens, _ = reference.token_pool(x, q, k, 3, 0.5, "sum")
    grad = torch.randn_like(tokens)
    (gx,) = torch.autograd.grad(tokens, x, grad)
    (rx,) = torch.autograd.grad(ref_tokens, x, grad)
    assert torch.equal(gx, rx)


# --- pool_backward --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_backward_scatter_and_batch_sum(dtype):
    B, K, C, rows = 3, 4, 5, 7
    index = torch.stack([torch.randperm(rows)[:K].sort().values for _ in range(B)]).to(DEVICE)
    # a non-contiguous gradient (the transpose of a [B, C, K] tensor)
    grad_tokens = torch.randn(B, C, K, device=DEVICE).to(dtype).transpose(1, 2)
    grad_rows, grad_sum = torch.ops.apkernels.pool_backward_triton(grad_tokens, index, rows, True)
    ref_rows, ref_sum = reference.pool_backward(grad_tokens, index, rows, True)
    assert torch.equal(grad_rows, ref_rows)
    assert_close(grad_sum, ref_sum, dtype)
    grad_rows, empty = torch.ops.apkernels.pool_backward_triton(grad_tokens.expand(B, K, C), index, rows, False)
    assert torch.equal(grad_rows, ref_rows) and empty.numel() == 0


# --- DAN ------------------------------------------------------------------------------------------


def check_dan_spatial_pool(x, z, dtype):
    x, z = x.requires_grad_(), z.requires_grad_()
    g = apkernels.dan_spatial_pool(x, z, backend="triton")
    ref_g, ref_s = reference.dan_spatial_pool(x, z)
    reduction = z.shape[2] * x.shape[1]  # error grows with the reduced extents
    assert_close(g, ref_g, dtype, scale=reduction)
    grad = torch.randn_like(g)
    gx, gz = torch.autograd.grad(g, (x, z), grad)
    rx, rz = reference.dan_spatial_pool_backward(grad, x.detach(), z.detach(), ref_s)
    assert_close(gx, rx, dtype, scale=reduction)
    assert_close(gz, rz, dtype, scale=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dan_spatial_pool_dtypes(dtype):
    # odd C and C2, P = 15 (not a power of two)
    x = torch.randn(2, 5, 3, 5, device=DEVICE).to(dtype)
    z = torch.randn(2, 3, 7, 3, 5, device=DEVICE).to(dtype)
    check_dan_spatial_pool(x, z, dtype)


@pytest.mark.parametrize(
    "B,M,C,C2,H,W,layout",
    [
        (1, 1, 1, 1, 1, 1, "contiguous"),  # one head, H = W = 1
        (2, 4, 6, 5, 3, 3, "channels_last"),
        (2, 2, 3, 4, 2, 3, "sliced"),
    ],
)
def test_dan_spatial_pool_shapes_and_layouts(B, M, C, C2, H, W, layout):
    if layout == "sliced":
        x = torch.randn(B, 2 * C, H, W + 2, device=DEVICE)[:, ::2, :, 1:-1]
        z = torch.randn(B, C2, M, H, W, device=DEVICE).transpose(1, 2)
    else:
        x, z = torch.randn(B, C, H, W, device=DEVICE), torch.randn(B, M, C2, H, W, device=DEVICE)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    check_dan_spatial_pool(x, z, torch.float32)


def test_dan_spatial_pool_float64_and_nan():
    x = torch.randn(2, 3, 2, 2, device=DEVICE, dtype=torch.float64)
    z = torch.randn(2, 2, 3, 2, 2, device=DEVICE, dtype=torch.float64)
    check_dan_spatial_pool(x.clone(), z.clone(), torch.float64)
    z[0, 1, 2, 1, 0] = float("nan")  # relu(NaN) = NaN: one head's attention map, all its channels
    g = apkernels.dan_spatial_pool(x, z, backend="triton")
    torch.testing.assert_close(g, reference.dan_spatial_pool(x, z)[0], equal_nan=True)
    assert g[0, 1].isnan().all() and not g[0, 0].isnan().any()


def check_dan_head_fusion(g, a, dtype):
    g, a = g.requires_grad_(), a.requires_grad_()
    fused, heads = apkernels.dan_head_fusion(g, a, backend="triton")
    ref_fused, ref_heads = reference.dan_head_fusion(g, a)
    M = g.shape[1]
    assert_close(heads, ref_heads, dtype)
    assert_close(fused, ref_fused, dtype, scale=M)
    grad_fused, grad_heads = torch.randn_like(fused), torch.randn_like(heads)
    dg, da = torch.autograd.grad((fused, heads), (g, a), (grad_fused, grad_heads))
    rg, ra = torch.autograd.grad((ref_fused, ref_heads), (g, a), (grad_fused, grad_heads))
    assert_close(dg, rg, dtype, scale=M)
    assert_close(da, ra, dtype, scale=M)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 4])  # M = 1: no log-softmax
def test_dan_head_fusion_dtypes(M, dtype):
    g = torch.randn(2, M, 7, device=DEVICE).to(dtype)
    a = torch.randn(2, M, 7, device=DEVICE).to(dtype)
    check_dan_head_fusion(g, a, dtype)


def test_dan_head_fusion_strided_and_float64():
    g = torch.randn(3, 7, 3, device=DEVICE).transpose(1, 2)  # [B, M=3, C=7], non-contiguous
    a = torch.randn(3, 3, 14, device=DEVICE)[:, :, ::2]
    check_dan_head_fusion(g, a, torch.float32)
    g64, a64 = torch.randn(2, 5, 3, device=DEVICE, dtype=torch.float64), torch.randn(2, 5, 3, device=DEVICE, dtype=torch.float64)
    check_dan_head_fusion(g64, a64, torch.float64)


# --- opcheck and compile --------------------------------------------------------------------------


def on_device(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to(DEVICE).requires_grad_(value.requires_grad)
    return value


@pytest.mark.parametrize("name,args", op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_triton_ops(name, args):
    args = tuple(on_device(a) for a in args)
    opcheck(getattr(torch.ops.apkernels, name + "_triton").default, args)


def test_compile_fullgraph_triton_backend():
    x, pos = small_ints(2, 8, 4, 4, device=DEVICE).requires_grad_(), torch.randn(16, 8, device=DEVICE, requires_grad=True)
    xt = torch.randn(2, 9, 6, device=DEVICE, requires_grad=True)
    q, k = qkv_views(2, 9, 2, 4, torch.float32)
    xs, z = torch.randn(2, 6, 3, 3, device=DEVICE), torch.randn(2, 2, 4, 3, 3, device=DEVICE, requires_grad=True)

    def f(backend):
        t, _ = apkernels.patch_pool(x, 5, pos, backend=backend)
        u, _ = apkernels.token_pool(xt, q, k, 4, scale=0.5, backend=backend)
        g = apkernels.dan_spatial_pool(xs, z, backend=backend)
        fused, _ = apkernels.dan_head_fusion(g, xs.mean((2, 3))[:, None].expand(-1, 2, -1), backend=backend)
        return t.square().sum() + u.square().sum() + fused.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled("triton")
    grads = torch.autograd.grad(out, (x, pos, xt, z))
    ref = f("reference")
    ref_grads = torch.autograd.grad(ref, (x, pos, xt, z))
    torch.testing.assert_close(out, ref)
    for actual, expected in zip(grads, ref_grads):
        torch.testing.assert_close(actual, expected)


# --- the compiled path, without a GPU ---------------------------------------------------------------


def compile_every_kernel_for_sm90():
    """Compile each Triton kernel (bf16 I/O: the widest set of conversions) for an sm_90 GPU, down
    to the cubin via the ptxas bundled with Triton. Needs no GPU, but runs without the interpreter:
    it catches what the interpreter accepts and the compiler does not."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from apkernels.triton_kernels import dan_head_fusion, dan_spatial_pool, patch_pool, pool_backward, token_pool

    def build(kernel, pointers, constexprs, floats=(), num_warps=4):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = "*" + pointers[name]
            else:
                signature[name] = "fp32" if name in floats else "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    bf16, acc = "bf16", tl.float32
    build(patch_pool._patch_pool_kernel, dict(x_ptr=bf16, pos_ptr=bf16, out_ptr=bf16, index_ptr="i64"),
          dict(SCORE=3, HAS_POS=True, N_PAD=256, BLOCK_C=16))
    build(token_pool._token_pool_kernel, dict(x_ptr=bf16, q_ptr=bf16, k_ptr=bf16, out_ptr=bf16, index_ptr="i64"),
          dict(SCORE=2, N_PAD=256, BLOCK_D=16, BLOCK_C=16), floats=("scale",))
    build(pool_backward._inverse_index_kernel, dict(index_ptr="i64", inv_ptr="i32", minmax_ptr="i64", counters_ptr="i32"),
          dict(BLOCK_R=32, BLOCK_K=32))
    build(pool_backward._pool_backward_kernel,
          dict(grad_ptr=bf16, index_ptr="i64", inv_ptr="i32", rows_ptr=bf16, sum_ptr=bf16, partial_ptr="fp32",
               counters_ptr="i32"),
          dict(REDUCE=True, WORKSPACE=True, ACC=acc, BLOCK_R=1, BLOCK_C=64), num_warps=1)
    build(patch_pool._patch_pool_tiled_kernel,
          dict(x_ptr=bf16, pos_ptr=bf16, out_ptr=bf16, index_ptr="i64", keys_ptr="i64"),
          dict(SCORE=3, HAS_POS=True, BLOCK_P=1024, BLOCK_C=4), num_warps=16)
    build(token_pool._token_pool_tiled_kernel,
          dict(x_ptr=bf16, q_ptr=bf16, k_ptr=bf16, out_ptr=bf16, index_ptr="i64", keys_ptr="i64"),
          dict(SCORE=2, BLOCK_J=512, BLOCK_D=8, BLOCK_C=8), floats=("scale",), num_warps=16)
    build(dan_spatial_pool._dan_spatial_pool_kernel, dict(x_ptr=bf16, z_ptr=bf16, g_ptr=bf16, s_ptr="fp32"),
          dict(ACC=acc, M_PAD=4, P_PAD=64, BLOCK_C=16, BLOCK_C2=64))
    build(dan_spatial_pool._dan_backward_kernel,
          dict(dg_ptr=bf16, x_ptr=bf16, z_ptr=bf16, s_ptr="fp32", dx_ptr=bf16, dz_ptr=bf16),
          dict(ACC=acc, M_PAD=4, P_PAD=64, BLOCK_C=16, BLOCK_C2=64))
    build(dan_spatial_pool._dan_backward_kernel,
          dict(dg_ptr="fp64", x_ptr="fp64", z_ptr="fp64", s_ptr="fp64", dx_ptr="fp64", dz_ptr="fp64"),
          dict(ACC=tl.float64, M_PAD=4, P_PAD=64, BLOCK_C=16, BLOCK_C2=64))
    build(dan_head_fusion._dan_head_fusion_kernel, dict(g_ptr=bf16, gate_ptr=bf16, fused_ptr=bf16, heads_ptr=bf16),
          dict(LOG_SOFTMAX=True, ACC=acc, M_PAD=4, BLOCK_C=1024))
    build(dan_head_fusion._dan_head_fusion_backward_kernel,
          dict(dfused_ptr=bf16, dheads_ptr=bf16, g_ptr=bf16, gate_ptr=bf16, heads_ptr=bf16, dg_ptr=bf16, dgate_ptr=bf16),
          dict(LOG_SOFTMAX=True, ACC=acc, M_PAD=4, BLOCK_C=1024))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every test above runs the compiled kernels")
def test_kernels_compile_for_gpu_without_one(tmp_path):
    run_python_compiled([__file__], TRITON_CACHE_DIR=str(tmp_path))


if __name__ == "__main__":
    compile_every_kernel_for_sm90()
