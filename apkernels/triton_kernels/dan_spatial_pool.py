"""Triton DAN spatial attention + global average pool and its backward, one program per image.

Forward: s[m, p] = sum_c2 relu(z[b, m, c2, p]) for all M heads (z read once), written out as the
op's second output (the backward reads it instead of recomputing it), then g[b, m, c] =
sum_p x[b, c, p] * s[m, p] / P block of channels by block for all heads at once (x read once):
the [B, M, C, P] product never exists. Backward, one launch: per image the saved s, one pass over x
that accumulates t[m, p] = sum_c dg[m, c] x[c, p] / P and writes dx[c, p] = sum_m dg[m, c] s[m, p] / P,
then one pass over z writing dz = 1[z > 0] * t. fp32 accumulation (fp64 for fp64). The whole map
(P = H*W positions, padded to a power of two) and all heads are one tile: DAN's maps are 7x7, 4 heads.
"""
import torch
import triton
import triton.language as tl

from .. import _checks
from . import _common

OP = "dan_spatial_pool"
DTYPES = _common.HALF_AND_FLOAT + (torch.float64,)
# Warps of a per-image program: a B = 256 call is only 256 programs, so each gets 8 warps (more
# loads in flight per SM; the backward's tiles then fit without spills).
IMAGE_WARPS = 8


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
    x_ptr, z_ptr, g_ptr, s_ptr,
    M, C, C2, W, P,
    sx_b, sx_c, sx_h, sx_w, sz_b, sz_m, sz_c, sz_h, sz_w, sg_b, sg_m, sg_c,
    ACC: tl.constexpr, M_PAD: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, P_PAD)
    in_p = p < P
    h, w = (p // W).to(tl.int64), (p % W).to(tl.int64)
    heads = tl.arange(0, M_PAD)
    in_m = heads < M
    z_offset = h * sz_h + w * sz_w
    s = tl.zeros([M_PAD, P_PAD], ACC)
    for m in range(0, M):
        s_m = _attention_map(z_ptr, b * sz_b + m * sz_m, z_offset, in_p, C2, sz_c, ACC, P_PAD, BLOCK_C2)
        tl.store(s_ptr + (b * M + m) * P + p, s_m, mask=in_p)
        s = tl.where(heads[:, None] == m, s_m[None, :], s)
    x_offset = h * sx_h + w * sx_w
    rows = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + rows).to(tl.int64)
        in_c = c < C
        xv = tl.load(x_ptr + b * sx_b + c[:, None] * sx_c + x_offset[None, :], mask=in_c[:, None] & in_p[None, :], other=0.0)
        g = tl.sum(xv.to(ACC)[None, :, :] * s[:, None, :], 2) / P  # [M_PAD, BLOCK_C]
        tl.store(g_ptr + b * sg_b + heads[:, None] * sg_m + c[None, :] * sg_c,
                 _common.round_to(g, g_ptr.dtype.element_ty), mask=in_m[:, None] & in_c[None, :])


@triton.jit
def _dan_backward_kernel(
    dg_ptr, x_ptr, z_ptr, s_ptr, dx_ptr, dz_ptr,
    M, C, C2, W, P,
    sd_b, sd_m, sd_c, sx_b, sx_c, sx_h, sx_w, sz_b, sz_m, sz_c, sz_h, sz_w,
    ACC: tl.constexpr, M_PAD: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    """Per image: one pass over x (t and dx), then one over z (dz = 1[z > 0] * t); dx, dz contiguous."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, P_PAD)
    in_p = p < P
    h, w = (p // W).to(tl.int64), (p % W).to(tl.int64)
    heads = tl.arange(0, M_PAD)
    in_m = heads < M
    s = tl.load(s_ptr + (b * M + heads[:, None]) * P + p[None, :], mask=in_m[:, None] & in_p[None, :], other=0.0).to(ACC)
    x_offset = h * sx_h + w * sx_w
    t = tl.zeros([M_PAD, P_PAD], ACC)
    rows = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + rows).to(tl.int64)
        in_c = c < C
        dg = tl.load(dg_ptr + b * sd_b + heads[:, None] * sd_m + c[None, :] * sd_c,
                     mask=in_m[:, None] & in_c[None, :], other=0.0).to(ACC)  # [M_PAD, BLOCK_C]
        xv = tl.load(x_ptr + b * sx_b + c[:, None] * sx_c + x_offset[None, :], mask=in_c[:, None] & in_p[None, :], other=0.0)
        t += tl.sum(dg[:, :, None] * xv.to(ACC)[None, :, :], 1)
        dx = tl.sum(dg[:, :, None] * s[:, None, :], 0) / P  # [BLOCK_C, P_PAD]
        tl.store(dx_ptr + (b * C + c[:, None]) * P + p[None, :], _common.round_to(dx, dx_ptr.dtype.element_ty),
                 mask=in_c[:, None] & in_p[None, :])
    t = t / P
    z_offset = h * sz_h + w * sz_w
    rows2 = tl.arange(0, BLOCK_C2)
    for m in range(0, M):
        t_m = tl.sum(tl.where(heads[:, None] == m, t, 0.0), 0)  # row m of t (the other rows add zeros)
        z_base = b * sz_b + m * sz_m
        dz_base = (b * M + m) * C2 * P
        for c0 in range(0, C2, BLOCK_C2):
            c2 = (c0 + rows2).to(tl.int64)
            mask = (c2 < C2)[:, None] & in_p[None, :]
            zv = tl.load(z_ptr + z_base + c2[:, None] * sz_c + z_offset[None, :], mask=mask, other=0.0)
            dz = tl.where(zv <= 0, 0.0, t_m[None, :])  # torch.relu's gradient: 0 where z <= 0 (even if t is NaN), t at NaN z
            tl.store(dz_ptr + dz_base + c2[:, None] * P + p[None, :], _common.round_to(dz, dz_ptr.dtype.element_ty), mask=mask)


def _sizes(x, z):
    B, C, H, W = x.shape
    P = H * W
    return B, z.shape[1], C, z.shape[2], W, P, _common.next_pow2(z.shape[1]), _common.next_pow2(P)


def _acc_torch_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dan_spatial_pool_triton(x, z):
    # The guard of direct torch.ops calls (the public function has checked already), as the
    # compiled kernels' C++ checks.
    _checks.dan_spatial_pool(x, z)
    _common.check_launch(OP, x=x, z=z)
    _common.check_dtype(OP, "x", x, DTYPES)
    B, M, C, C2, W, P, m_pad, p_pad = _sizes(x, z)
    g = x.new_empty(B, M, C)
    s = x.new_empty(B, M, P, dtype=_acc_torch_dtype(x.dtype))  # the attention maps, saved for the backward
    _dan_spatial_pool_kernel[(B,)](
        x, z, g, s, M, C, C2, W, P, *x.stride(), *z.stride(), *g.stride(),
        ACC=_common.acc_dtype(x.dtype), M_PAD=m_pad, P_PAD=p_pad,
        BLOCK_C=_common.block_for(C, m_pad * p_pad), BLOCK_C2=_common.block_for(C2, p_pad), num_warps=IMAGE_WARPS,
    )
    return g, s


def dan_spatial_pool_backward_triton(grad_g, x, z, s):
    _common.check_launch(OP + "_backward", grad_g=grad_g, x=x, z=z, s=s)
    _common.check_dtype(OP + "_backward", "x", x, DTYPES)
    B, M, C, C2, W, P, m_pad, p_pad = _sizes(x, z)
    if tuple(grad_g.shape) != (B, M, C):
        raise ValueError(f"{OP}_backward_triton: grad_g must have shape {(B, M, C)}, got {tuple(grad_g.shape)}")
    acc = _acc_torch_dtype(x.dtype)
    if tuple(s.shape) != (B, M, P) or s.dtype != acc or not s.is_contiguous():
        raise ValueError(f"{OP}_backward_triton: s must be a contiguous {acc} tensor of shape {(B, M, P)} "
                         f"(the forward's attention maps), got {s.dtype} {tuple(s.shape)}")
    grad_x = x.new_empty(x.shape)  # contiguous, as the fake implementation says
    grad_z = z.new_empty(z.shape)
    _dan_backward_kernel[(B,)](
        grad_g, x, z, s, grad_x, grad_z, M, C, C2, W, P, *grad_g.stride(), *x.stride(), *z.stride(),
        ACC=_common.acc_dtype(x.dtype), M_PAD=m_pad, P_PAD=p_pad,
        BLOCK_C=_common.block_for(C, m_pad * p_pad), BLOCK_C2=_common.block_for(C2, p_pad), num_warps=IMAGE_WARPS,
    )
    return grad_x, grad_z


_common.register({OP: dan_spatial_pool_triton, OP + "_backward": dan_spatial_pool_backward_triton})
