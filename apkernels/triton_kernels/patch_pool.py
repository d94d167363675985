"""Triton attentive patch pooling: one program per image does it all - channel scores
with fp32 accumulation, top-k selection, kept positions in ascending order, the gather of the kept
columns of x [B, C, H, W] (any strides) as tokens, + pos.

x is read twice (scores, then the kept columns): reading it once needs the image's channels held
on chip between the two phases, across programs (a cluster sharing its shared memory), which
Triton does not expose; one program cannot hold an image (602 KB fp32 at 768 x 14 x 14)."""
import torch
import triton
import triton.language as tl

from .. import _checks, reference
from . import _common

OP = "patch_pool"
SCORE_CODES = {name: i for i, name in enumerate(reference.PATCH_SCORES)}  # sum_abs, sum, sum_sq, max, max_abs
# Maps of up to ROW_POSITIONS positions (padded to a power of two) keep the row of scores in
# registers and sort it (2048: 82 registers at 16 warps, no spills); larger ones (128 x 128 spilled
# 9 KB per thread) go tile by tile with a radix select over keys in a global workspace,
# TILE_POSITIONS positions per tile.
ROW_POSITIONS = 2048
TILE_POSITIONS = 1024


@triton.jit
def _position_scores(x_base, p, valid, C, W, sx_c, sx_h, sx_w, SCORE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Scores of positions p (a [BLOCK_P] tile, `valid` inside the map) over all channels, fp32."""
    p_offset = (p // W).to(tl.int64) * sx_h + (p % W).to(tl.int64) * sx_w
    channels = tl.arange(0, BLOCK_C)
    if SCORE >= 3:
        score = tl.full([BLOCK_P], float("-inf"), tl.float32)
    else:
        score = tl.zeros([BLOCK_P], tl.float32)
    has_nan = tl.zeros([BLOCK_P], tl.int32)
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
    return score


@triton.jit
def _gather_positions(x_base, pos_ptr, out_base, p, selected, slot, C, W, sx_c, sx_h, sx_w, spos_n, spos_c, so_k, so_c,
                      HAS_POS: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[slot] = x[:, p] (+ pos[p]) for the selected positions of the tile p, all channels."""
    p_offset = (p // W).to(tl.int64) * sx_h + (p % W).to(tl.int64) * sx_w
    out_rows = out_base + slot.to(tl.int64)[:, None] * so_k
    channels = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + channels
        mask = selected[:, None] & (c < C)[None, :]
        v = tl.load(x_base + p_offset[:, None] + c[None, :].to(tl.int64) * sx_c, mask=mask, other=0.0)
        if HAS_POS:
            e = tl.load(pos_ptr + p[:, None].to(tl.int64) * spos_n + c[None, :].to(tl.int64) * spos_c, mask=mask, other=0.0)
            v = v.to(tl.float32) + e.to(tl.float32)  # one rounding, as torch's x + pos
        tl.store(out_rows + c[None, :].to(tl.int64) * so_c, _common.round_to(v, out_base.dtype.element_ty), mask=mask)


@triton.jit
def _patch_pool_kernel(
    x_ptr, pos_ptr, out_ptr, index_ptr,
    C, W, N, K,
    sx_b, sx_c, sx_h, sx_w, spos_n, spos_c, so_b, so_k, so_c, si_b, si_k,
    SCORE: tl.constexpr, HAS_POS: tl.constexpr, N_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Maps of up to ROW_POSITIONS positions: the whole row of scores in registers, tl.sort."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, N_PAD)
    valid = p < N
    x_base = x_ptr + b * sx_b
    score = _position_scores(x_base, p, valid, C, W, sx_c, sx_h, sx_w, SCORE, N_PAD, BLOCK_C)
    selected, slot = _common.select_topk(score, p, valid, K, N_PAD)
    tl.store(index_ptr + b * si_b + slot.to(tl.int64) * si_k, p.to(tl.int64), mask=selected)
    _gather_positions(x_base, pos_ptr, out_ptr + b * so_b, p, selected, slot, C, W, sx_c, sx_h, sx_w, spos_n, spos_c,
                      so_k, so_c, HAS_POS, BLOCK_C)


@triton.jit
def _patch_pool_tiled_kernel(
    x_ptr, pos_ptr, out_ptr, index_ptr, keys_ptr,
    C, W, N, K,
    sx_b, sx_c, sx_h, sx_w, spos_n, spos_c, so_b, so_k, so_c, si_b, si_k,
    SCORE: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Larger maps: tiles of BLOCK_P positions; the keys go to keys_ptr [B, N] (8 bytes per
    position), the threshold comes from a radix select over them, then each tile is compacted
    (a running count of kept positions) and gathered."""
    b = tl.program_id(0).to(tl.int64)
    x_base = x_ptr + b * sx_b
    keys_row = keys_ptr + b * N
    offs = tl.arange(0, BLOCK_P)
    for p0 in range(0, N, BLOCK_P):
        p = p0 + offs
        valid = p < N
        score = _position_scores(x_base, p, valid, C, W, sx_c, sx_h, sx_w, SCORE, BLOCK_P, BLOCK_C)
        _common.store_keys(keys_row, score, p, valid)
    tl.debug_barrier()  # every key is read by other threads of the program
    prefix, mask = _common.radix_threshold(keys_row, N, K, BLOCK_P)
    written = tl.program_id(0) * 0
    for p0 in range(0, N, BLOCK_P):
        p = p0 + offs
        valid = p < N
        selected, slot = _common.tile_selection(keys_row, p, valid, prefix, mask, written)
        tl.store(index_ptr + b * si_b + slot.to(tl.int64) * si_k, p.to(tl.int64), mask=selected)
        _gather_positions(x_base, pos_ptr, out_ptr + b * so_b, p, selected, slot, C, W, sx_c, sx_h, sx_w, spos_n,
                          spos_c, so_k, so_c, HAS_POS, BLOCK_C)
        written += tl.sum(selected.to(tl.int32), 0)


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
    strides = (*x.stride(), *(pos2d.stride()[:2] if pos is not None else (0, 0)), *out.stride(), *index.stride())
    if B == 0:
        return out, index
    if n_pad <= ROW_POSITIONS:
        block_c = _common.block_for(C, n_pad)
        _patch_pool_kernel[(B,)](
            x, pos2d, out, index, C, W, N, keep, *strides,
            SCORE=SCORE_CODES[score], HAS_POS=pos is not None, N_PAD=n_pad, BLOCK_C=block_c,
            num_warps=_common.warps_for_tile(n_pad * block_c),
        )
    else:
        keys = torch.empty(B, N, dtype=torch.int64, device=x.device)  # selection workspace, no fill
        block_p = min(TILE_POSITIONS, n_pad)
        block_c = _common.block_for(C, block_p)
        _patch_pool_tiled_kernel[(B,)](
            x, pos2d, out, index, keys, C, W, N, keep, *strides,
            SCORE=SCORE_CODES[score], HAS_POS=pos is not None, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=_common.warps_for_tile(block_p * block_c),
        )
    return out, index


_common.register({OP: patch_pool_triton})
