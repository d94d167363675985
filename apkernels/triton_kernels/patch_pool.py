"""Triton attentive patch pooling: one program per image does it all - channel scores
with fp32 accumulation, top-k selection, kept positions in ascending order, the gather of the kept
columns of x [B, C, H, W] (any strides) as tokens, + pos."""
import torch
import triton
import triton.language as tl

from .. import _checks, reference
from . import _common

OP = "patch_pool"
SCORE_CODES = {name: i for i, name in enumerate(reference.PATCH_SCORES)}  # sum_abs, sum, sum_sq, max, max_abs


@triton.jit
def _patch_pool_kernel(
    x_ptr, pos_ptr, out_ptr, index_ptr,
    C, W, N, K,
    sx_b, sx_c, sx_h, sx_w, spos_n, spos_c, so_b, so_k, so_c, si_b, si_k,
    SCORE: tl.constexpr, HAS_POS: tl.constexpr, N_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, N_PAD)
    valid = p < N
    p_offset = (p // W).to(tl.int64) * sx_h + (p % W).to(tl.int64) * sx_w
    x_base = x_ptr + b * sx_b
    channels = tl.arange(0, BLOCK_C)

    # 1. scores over channels, fp32 accumulation
    if SCORE >= 3:
        score = tl.full([N_PAD], float("-inf"), tl.float32)
    else:
        score = tl.zeros([N_PAD], tl.float32)
    has_nan = tl.zeros([N_PAD], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + channels
        mask = (c < C)[:, None] & valid[None, :]
        v = tl.load(x_base + c[:, None].to(tl.int64) * sx_c + p_offset[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
        if SCORE == 0:
            score += tl.sum(tl.abs(v), 0)
        elif SCORE == 1:
            score += tl.sum(v, 0)
        elif SCORE == 2:
            score += tl.sum(v * v, 0)
        else:
            if SCORE == 4:
                v = tl.abs(v)
            v = tl.where(mask, v, float("-inf"))
            has_nan = tl.maximum(has_nan, tl.max((v != v).to(tl.int32), 0))
            score = tl.maximum(score, tl.max(v, 0))
    if SCORE >= 3:  # amax propagates NaN; tl.max / tl.maximum leave it unspecified
        score = tl.where(has_nan > 0, float("nan"), score)

    # 2. selection, kept positions in ascending order
    selected, slot = _common.select_topk(score, p, valid, K, N_PAD)
    tl.store(index_ptr + b * si_b + slot.to(tl.int64) * si_k, p.to(tl.int64), mask=selected)

    # 3. gather the kept columns as rows (+ pos), written straight to their output slot
    out_base = out_ptr + b * so_b + slot.to(tl.int64)[:, None] * so_k
    for c0 in range(0, C, BLOCK_C):
        c = c0 + channels
        mask = selected[:, None] & (c < C)[None, :]
        v = tl.load(x_base + p_offset[:, None] + c[None, :].to(tl.int64) * sx_c, mask=mask, other=0.0)
        if HAS_POS:
            e = tl.load(pos_ptr + p[:, None].to(tl.int64) * spos_n + c[None, :].to(tl.int64) * spos_c, mask=mask, other=0.0)
            v = v.to(tl.float32) + e.to(tl.float32)  # one rounding, as torch's x + pos
        tl.store(out_base + c[None, :].to(tl.int64) * so_c, _common.round_to(v, out_ptr.dtype.element_ty), mask=mask)


def patch_pool_triton(x, keep, pos, score):
    # The guard of direct torch.ops calls (the public function has checked already), as the
    # compiled kernels' C++ checks.
    _checks.patch_pool(x, keep, pos, score)
    _common.check_launch(OP, x=x, pos=pos)
    _common.check_dtype(OP, "x", x, _common.HALF_AND_FLOAT)
    B, C, H, W = x.shape
    N = H * W
    out = x.new_empty(B, keep, C)
    index = x.new_empty(B, keep, dtype=torch.long)
    pos2d = x if pos is None else pos.reshape(N, C)  # placeholder pointer when there is no pos
    n_pad = _common.next_pow2(N)
    _patch_pool_kernel[(B,)](
        x, pos2d, out, index,
        C, W, N, keep,
        *x.stride(), *(pos2d.stride()[:2] if pos is not None else (0, 0)), *out.stride(), *index.stride(),
        SCORE=SCORE_CODES[score], HAS_POS=pos is not None, N_PAD=n_pad, BLOCK_C=_common.block_for(C, n_pad),
        num_warps=_common.warps_for(n_pad),
    )
    return out, index


_common.register({OP: patch_pool_triton})
