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


@triton.jit
def _token_pool_kernel(
    x_ptr, q_ptr, k_ptr, out_ptr, index_ptr,
    N, C, HEADS, D, K, scale,
    sx_b, sx_n, sx_c, sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sk_d, so_b, so_k, so_c, si_b, si_k,
    SCORE: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, N_PAD)  # patch token j is token j + 1
    valid = j < N - 1
    token = (j + 1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)

    # 1. scores: the CLS row of the pre-softmax logits, reduced over heads
    if SCORE == 2:
        score = tl.full([N_PAD], float("-inf"), tl.float32)
    else:
        score = tl.zeros([N_PAD], tl.float32)
    has_nan = tl.zeros([N_PAD], tl.int32)
    for h in range(0, HEADS):
        dot = tl.zeros([N_PAD], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = (d0 + dims).to(tl.int64)
            in_d = d < D
            qv = tl.load(q_ptr + b * sq_b + h * sq_h + d * sq_d, mask=in_d, other=0.0).to(tl.float32)
            kv = tl.load(
                k_ptr + b * sk_b + h * sk_h + token[:, None] * sk_n + d[None, :] * sk_d,
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

    # 2. selection: CLS first, then the kept patch tokens in ascending order
    selected, slot = _common.select_topk(score, j, valid, K, N_PAD)
    out_row = (slot + 1).to(tl.int64)
    tl.store(index_ptr + b * si_b, b * 0)  # CLS (an int64 zero)
    tl.store(index_ptr + b * si_b + out_row * si_k, token, mask=selected)

    # 3. gather CLS + the kept tokens
    channels = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + channels).to(tl.int64)
        in_c = c < C
        cls = tl.load(x_ptr + b * sx_b + c * sx_c, mask=in_c)
        tl.store(out_ptr + b * so_b + c * so_c, cls, mask=in_c)
        mask = selected[:, None] & in_c[None, :]
        v = tl.load(x_ptr + b * sx_b + token[:, None] * sx_n + c[None, :] * sx_c, mask=mask)
        tl.store(out_ptr + b * so_b + out_row[:, None] * so_k + c[None, :] * so_c, v, mask=mask)


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
    n_pad = _common.next_pow2(N - 1)
    block_d = _common.block_for(head_dim, n_pad)
    block_c = _common.block_for(C, n_pad)
    sq_b, sq_h, _, sq_d = q.stride()
    if B == 0:
        return out, index
    num_warps = _common.warps_for_tile(n_pad * max(block_d, block_c))
    _token_pool_kernel[(B,)](
        x, q, k, out, index,
        N, C, heads, head_dim, keep, float(scale),
        *x.stride(), sq_b, sq_h, sq_d, *k.stride(), *out.stride(), *index.stride(),
        SCORE=SCORE_CODES[score], N_PAD=n_pad, BLOCK_D=block_d, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out, index


_common.register({OP: token_pool_triton})
