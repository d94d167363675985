"""Triton DAN spatial attention + global average pool and its backward.

Forward, one program per (image, head): s[p] = sum_c2 relu(z[b, m, c2, p]) over the whole map,
then g[b, m, c] = sum_p x[b, c, p] * s[p] / P block of channels by block: the [B, M, C, P] product
never exists. Backward: one program per (image, head) computes s and t[p] = sum_c dg[m, c] x[c, p] / P,
writes dz = 1[z > 0] * t and keeps s in an fp32 [B, M, P] scratch; a second kernel, per (image,
channel block), writes dx[c, p] = sum_m dg[m, c] s[m, p] / P. fp32 accumulation (fp64 for fp64).
The whole map (P = H*W positions, padded to a power of two) is one tile: DAN's maps are 7x7.
"""
import torch
import triton
import triton.language as tl

from .. import _checks
from . import _common

OP = "dan_spatial_pool"
DTYPES = _common.HALF_AND_FLOAT + (torch.float64,)


@triton.jit
def _attention_map(z_ptr, z_base, z_offset, in_p, C2, sz_c, ACC: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C2: tl.constexpr):
    """s[p] = sum over c2 of relu(z[c2, p]) for one (image, head); NaN propagates as in torch.relu."""
    s = tl.zeros([P_PAD], ACC)
    rows = tl.arange(0, BLOCK_C2)
    for c0 in range(0, C2, BLOCK_C2):
        c2 = (c0 + rows).to(tl.int64)
        mask = (c2 < C2)[:, None] & in_p[None, :]
        zv = tl.load(z_ptr + z_base + c2[:, None] * sz_c + z_offset[None, :], mask=mask, other=0.0).to(ACC)
        s += tl.sum(tl.where(zv < 0, 0.0, zv), 0)
    return s


@triton.jit
def _dan_spatial_pool_kernel(
    x_ptr, z_ptr, g_ptr,
    M, C, C2, W, P,
    sx_b, sx_c, sx_h, sx_w, sz_b, sz_m, sz_c, sz_h, sz_w, sg_b, sg_m, sg_c,
    ACC: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // M).to(tl.int64)
    m = (pid % M).to(tl.int64)
    p = tl.arange(0, P_PAD)
    in_p = p < P
    h, w = (p // W).to(tl.int64), (p % W).to(tl.int64)
    s = _attention_map(z_ptr, b * sz_b + m * sz_m, h * sz_h + w * sz_w, in_p, C2, sz_c, ACC, P_PAD, BLOCK_C2)
    x_offset = h * sx_h + w * sx_w
    rows = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + rows).to(tl.int64)
        in_c = c < C
        xv = tl.load(x_ptr + b * sx_b + c[:, None] * sx_c + x_offset[None, :], mask=in_c[:, None] & in_p[None, :], other=0.0)
        g = tl.sum(xv.to(ACC) * s[None, :], 1) / P
        tl.store(g_ptr + b * sg_b + m * sg_m + c * sg_c, _common.round_to(g, g_ptr.dtype.element_ty), mask=in_c)


@triton.jit
def _dan_backward_heads_kernel(
    dg_ptr, x_ptr, z_ptr, dz_ptr, s_ptr,
    M, C, C2, W, P,
    sd_b, sd_m, sd_c, sx_b, sx_c, sx_h, sx_w, sz_b, sz_m, sz_c, sz_h, sz_w,
    ACC: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    """Per (image, head): s -> scratch, t = sum_c dg[c] x[c, :] / P, dz = 1[z > 0] * t (contiguous)."""
    pid = tl.program_id(0)
    b = (pid // M).to(tl.int64)
    m = (pid % M).to(tl.int64)
    p = tl.arange(0, P_PAD)
    in_p = p < P
    h, w = (p // W).to(tl.int64), (p % W).to(tl.int64)
    z_base = b * sz_b + m * sz_m
    z_offset = h * sz_h + w * sz_w
    s = _attention_map(z_ptr, z_base, z_offset, in_p, C2, sz_c, ACC, P_PAD, BLOCK_C2)
    tl.store(s_ptr + pid.to(tl.int64) * P + p, s, mask=in_p)

    x_offset = h * sx_h + w * sx_w
    t = tl.zeros([P_PAD], ACC)
    rows = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + rows).to(tl.int64)
        in_c = c < C
        dg = tl.load(dg_ptr + b * sd_b + m * sd_m + c * sd_c, mask=in_c, other=0.0).to(ACC)
        xv = tl.load(x_ptr + b * sx_b + c[:, None] * sx_c + x_offset[None, :], mask=in_c[:, None] & in_p[None, :], other=0.0)
        t += tl.sum(dg[:, None] * xv.to(ACC), 0)
    t = t / P

    rows2 = tl.arange(0, BLOCK_C2)
    dz_base = pid.to(tl.int64) * C2 * P
    for c0 in range(0, C2, BLOCK_C2):
        c2 = (c0 + rows2).to(tl.int64)
        mask = (c2 < C2)[:, None] & in_p[None, :]
        zv = tl.load(z_ptr + z_base + c2[:, None] * sz_c + z_offset[None, :], mask=mask, other=0.0)
        dz = (zv > 0).to(ACC) * t[None, :]  # a product, not a select: NaN in t propagates as in torch
        tl.store(dz_ptr + dz_base + c2[:, None] * P + p[None, :], _common.round_to(dz, dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dan_backward_x_kernel(
    dg_ptr, s_ptr, dx_ptr,
    M, C, P, NUM_C_BLOCKS,
    sd_b, sd_m, sd_c,
    ACC: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per (image, channel block): dx[c, p] = sum_m dg[m, c] s[m, p] / P (contiguous)."""
    pid = tl.program_id(0)
    b = (pid // NUM_C_BLOCKS).to(tl.int64)
    c = ((pid % NUM_C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    in_c = c < C
    p = tl.arange(0, P_PAD)
    in_p = p < P
    acc = tl.zeros([BLOCK_C, P_PAD], ACC)
    for m in range(0, M):
        dg = tl.load(dg_ptr + b * sd_b + m * sd_m + c * sd_c, mask=in_c, other=0.0).to(ACC)
        s = tl.load(s_ptr + (b * M + m) * P + p, mask=in_p, other=0.0)
        acc += dg[:, None] * s[None, :]
    dx = acc / P
    tl.store(dx_ptr + (b * C + c[:, None]) * P + p[None, :], _common.round_to(dx, dx_ptr.dtype.element_ty),
             mask=in_c[:, None] & in_p[None, :])


def _sizes(x, z):
    B, C, H, W = x.shape
    P = H * W
    p_pad = _common.next_pow2(P)
    return B, z.shape[1], C, z.shape[2], W, P, p_pad


def dan_spatial_pool_triton(x, z):
    # The guard of direct torch.ops calls (the public function has checked already), as the
    # compiled kernels' C++ checks.
    _checks.dan_spatial_pool(x, z)
    _common.check_launch(OP, x=x, z=z)
    _common.check_dtype(OP, "x", x, DTYPES)
    B, M, C, C2, W, P, p_pad = _sizes(x, z)
    g = x.new_empty(B, M, C)
    _dan_spatial_pool_kernel[(B * M,)](
        x, z, g, M, C, C2, W, P, *x.stride(), *z.stride(), *g.stride(),
        ACC=_common.acc_dtype(x.dtype), P_PAD=p_pad,
        BLOCK_C=_common.block_for(C, p_pad), BLOCK_C2=_common.block_for(C2, p_pad),
    )
    return g


def dan_spatial_pool_backward_triton(grad_g, x, z):
    _common.check_launch(OP + "_backward", grad_g=grad_g, x=x, z=z)
    _common.check_dtype(OP + "_backward", "x", x, DTYPES)
    B, M, C, C2, W, P, p_pad = _sizes(x, z)
    if tuple(grad_g.shape) != (B, M, C):
        raise ValueError(f"{OP}_backward_triton: grad_g must have shape {(B, M, C)}, got {tuple(grad_g.shape)}")
    acc = _common.acc_dtype(x.dtype)
    grad_x = x.new_empty(x.shape)  # contiguous, as the fake implementation says
    grad_z = z.new_empty(z.shape)
    s = x.new_empty(B, M, P, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)  # attention maps
    block_c = _common.block_for(C, p_pad)
    _dan_backward_heads_kernel[(B * M,)](
        grad_g, x, z, grad_z, s, M, C, C2, W, P, *grad_g.stride(), *x.stride(), *z.stride(),
        ACC=acc, P_PAD=p_pad, BLOCK_C=block_c, BLOCK_C2=_common.block_for(C2, p_pad),
    )
    num_c_blocks = triton.cdiv(C, block_c)
    _dan_backward_x_kernel[(B * num_c_blocks,)](
        grad_g, s, grad_x, M, C, P, num_c_blocks, *grad_g.stride(),
        ACC=acc, P_PAD=p_pad, BLOCK_C=block_c,
    )
    return grad_x, grad_z


_common.register({OP: dan_spatial_pool_triton, OP + "_backward": dan_spatial_pool_backward_triton})
