"""Triton attentive token pooling: one program per sequence scores the N-1 patch tokens
from the CLS query row (q[:, h, 0] . k[:, h, j] * scale, reduced over heads, fp32 accumulation),
selects the top `keep`, and gathers CLS + the kept tokens. q and k are read through their strides,
so views of a [B, N, 3, heads, head_dim] qkv tensor need no copy; only q[:, :, 0] is read, and every
element once.

One program per sequence is the unit because the selection needs all of a sequence's scores: Triton
has no cluster / distributed shared memory to share them between programs, and splitting the gather
over programs would make each re-read k to score again. The program is wide instead (up to 16 warps,
at most 8 tile elements per thread: no spills), so the paper batch fills the SMs' warp slots. (A
persistent loop over sequences was tried: it raised fp32 registers from 58 to 128.)"""
import torch
import triton
import triton.language as tl

from .. import _checks, reference
from . import _common

OP = "token_pool"
SCORE_CODES = {name: i for i, name in enumerate(reference.TOKEN_SCORES)}  # sum, sum_abs, max
# Up to ROW_TOKENS patch tokens (padded to a power of two) keep the row of scores in registers and
# sort it (1024: 64 registers at 16 warps, no spills; 2048 spilled); more go tile by tile with a
# radix select over keys in a global workspace, TILE_TOKENS tokens per tile.
ROW_TOKENS = 1024
TILE_TOKENS = 512


@triton.jit
def _token_scores(q_base, k_base, j, valid, HEADS, D, scale, sq_h, sq_d, sk_h, sk_n, sk_d,
                  SCORE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores of patch tokens j + 1 (a [BLOCK_J] tile): the CLS row of the pre-softmax logits,
    reduced over heads in head order, fp32."""
    token = (j + 1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    if SCORE == 2:
        score = tl.full([BLOCK_J], float("-inf"), tl.float32)
    else:
        score = tl.zeros([BLOCK_J], tl.float32)
    has_nan = tl.zeros([BLOCK_J], tl.int32)
    for h in range(0, HEADS):
        dot = tl.zeros([BLOCK_J], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = (d0 + dims).to(tl.int64)
            in_d = d < D
            qv = tl.load(q_base + h * sq_h + d * sq_d, mask=in_d, other=0.0).to(tl.float32)
            kv = tl.load(
                k_base + h * sk_h + token[:, None] * sk_n + d[None, :] * sk_d,
                mask=valid[:, None] & in_d[None, :], other=0.0,
            ).to(tl.float32)
            dot += tl.sum(kv * qv[None, :], 1)
        logit = dot * scale
        if SCORE == 0:
            score += logit
        elif SCORE == 1:
            score += tl.abs(logit)
        else:
            has_nan = tl.maximum(has_nan, (logit != logit).to(tl.int32))
            score = tl.maximum(score, logit)
    if SCORE == 2:  # amax propagates NaN; tl.maximum leaves it unspecified
        score = tl.where(has_nan > 0, float("nan"), score)
    return score


@triton.jit
def _gather_tokens(x_base, out_base, index_base, j, selected, slot, C, sx_n, sx_c, so_k, so_c, si_k,
                   BLOCK_C: tl.constexpr):
    """Kept patch tokens j + 1 of the tile: index[slot + 1] = j + 1, out[slot + 1] = x[j + 1]."""
    token = (j + 1).to(tl.int64)
    out_row = (slot + 1).to(tl.int64)
    tl.store(index_base + out_row * si_k, token, mask=selected)
    channels = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + channels).to(tl.int64)
        mask = selected[:, None] & (c < C)[None, :]
        v = tl.load(x_base + token[:, None] * sx_n + c[None, :] * sx_c, mask=mask)
        tl.store(out_base + out_row[:, None] * so_k + c[None, :] * so_c, v, mask=mask)


@triton.jit
def _copy_cls(x_base, out_base, index_base, C, sx_c, so_c, BLOCK: tl.constexpr):
    """index[0] = 0 and out[0] = x[0]: CLS is always kept, first."""
    tl.store(index_base, tl.program_id(0).to(tl.int64) * 0)
    channels = tl.arange(0, BLOCK)
    for c0 in range(0, C, BLOCK):
        c = (c0 + channels).to(tl.int64)
        tl.store(out_base + c * so_c, tl.load(x_base + c * sx_c, mask=c < C), mask=c < C)


@triton.jit
def _token_pool_kernel(
    x_ptr, q_ptr, k_ptr, out_ptr, index_ptr,
    N, C, HEADS, D, K, scale,
    sx_b, sx_n, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sk_d, so_b, so_k, so_c, si_b, si_k,
    SCORE: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Up to ROW_TOKENS patch tokens: the whole row of scores in registers, tl.sort."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, N_PAD)  # patch token j is token j + 1
    valid = j < N - 1
    score = _token_scores(q_ptr + b * sq_b, k_ptr + b * sk_b, j, valid, HEADS, D, scale, sq_h, sq_d, sk_h, sk_n, sk_d,
                          SCORE, N_PAD, BLOCK_D)
    selected, slot = _common.select_topk(score, j, valid, K, N_PAD)
    _copy_cls(x_ptr + b * sx_b, out_ptr + b * so_b, index_ptr + b * si_b, C, sx_c, so_c, N_PAD * BLOCK_C)
    _gather_tokens(x_ptr + b * sx_b, out_ptr + b * so_b, index_ptr + b * si_b, j, selected, slot, C, sx_n, sx_c, so_k,
                   so_c, si_k, BLOCK_C)


@triton.jit
def _token_pool_tiled_kernel(
    x_ptr, q_ptr, k_ptr, out_ptr, index_ptr, keys_ptr,
    N, C, HEADS, D, K, scale,
    sx_b, sx_n, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sk_d, so_b, so_k, so_c, si_b, si_k,
    SCORE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """More tokens: tiles of BLOCK_J tokens; keys in keys_ptr [B, N - 1], a radix select over them,
    then each tile is compacted (a running count of kept tokens) and gathered."""
    b = tl.program_id(0).to(tl.int64)
    n = N - 1
    keys_row = keys_ptr + b * n
    offs = tl.arange(0, BLOCK_J)
    for j0 in range(0, n, BLOCK_J):
        j = j0 + offs
        valid = j < n
        score = _token_scores(q_ptr + b * sq_b, k_ptr + b * sk_b, j, valid, HEADS, D, scale, sq_h, sq_d, sk_h, sk_n,
                              sk_d, SCORE, BLOCK_J, BLOCK_D)
        _common.store_keys(keys_row, score, j, valid)
    tl.debug_barrier()  # every key is read by other threads of the program
    prefix, mask = _common.radix_threshold(keys_row, n, K, BLOCK_J)
    _copy_cls(x_ptr + b * sx_b, out_ptr + b * so_b, index_ptr + b * si_b, C, sx_c, so_c, BLOCK_J * BLOCK_C)
    written = tl.program_id(0) * 0
    for j0 in range(0, n, BLOCK_J):
        j = j0 + offs
        valid = j < n
        selected, slot = _common.tile_selection(keys_row, j, valid, prefix, mask, written)
        _gather_tokens(x_ptr + b * sx_b, out_ptr + b * so_b, index_ptr + b * si_b, j, selected, slot, C, sx_n, sx_c,
                       so_k, so_c, si_k, BLOCK_C)
        written += tl.sum(selected.to(tl.int32), 0)


def token_pool_triton(x, q, k, keep, scale, score):
    # The guard of direct torch.ops calls (the public function has checked already), as the
    # compiled kernels' C++ checks.
    _checks.token_pool(x, q, k, keep, scale, score)
    _common.check_launch(OP, x=x, q=q, k=k)
    _common.check_dtype(OP, "x", x, _common.HALF_AND_FLOAT)
    _common.check_dtype(OP, "q", q, _common.HALF_AND_FLOAT)
    B, N, C = x.shape
    heads, head_dim = k.shape[1], k.shape[3]
    out = x.new_empty(B, keep + 1, C)
    index = x.new_empty(B, keep + 1, dtype=torch.long)
    if B == 0:
        return out, index
    n_pad = _common.next_pow2(N - 1)
    sq_b, sq_h, _, sq_d = q.stride()
    args = (N, C, heads, head_dim, keep, float(scale),
            *x.stride(), sq_b, sq_h, sq_d, *k.stride(), *out.stride(), *index.stride())
    if n_pad <= ROW_TOKENS:
        block_d = _common.block_for(head_dim, n_pad)
        block_c = _common.block_for(C, n_pad)
        _token_pool_kernel[(B,)](
            x, q, k, out, index, *args,
            SCORE=SCORE_CODES[score], N_PAD=n_pad, BLOCK_D=block_d, BLOCK_C=block_c,
            num_warps=_common.warps_for_tile(n_pad * max(block_d, block_c)),
        )
    else:
        keys = torch.empty(B, N - 1, dtype=torch.int64, device=x.device)  # selection workspace, no fill
        block_j = min(TILE_TOKENS, n_pad)
        block_d = _common.block_for(head_dim, block_j)
        block_c = _common.block_for(C, block_j)
        _token_pool_tiled_kernel[(B,)](
            x, q, k, out, index, keys, *args,
            SCORE=SCORE_CODES[score], BLOCK_J=block_j, BLOCK_D=block_d, BLOCK_C=block_c,
            num_warps=_common.warps_for_tile(block_j * max(block_d, block_c)),
        )
    return out, index


_common.register({OP: token_pool_triton})
