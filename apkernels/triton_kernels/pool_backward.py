"""Triton `pool_backward` (the backward of both pooling ops): grad_rows [B, num_rows, C] = 0, then
grad_rows[b, index[b, j]] += grad_tokens[b, j] for j ascending - one program per (batch item,
channel block) walks j in order, so a repeated index accumulates deterministically (no atomics) -
then (reduce_batch) the batch sum of those rows, the position embedding gradient, as a fixed-order
loop over the batch."""
import triton
import triton.language as tl

from .. import _backend, _checks, reference
from . import _common

OP = "pool_backward"


@triton.jit
def _scatter_add_rows_kernel(
    grad_ptr, index_ptr, rows_ptr,
    K, C,
    sg_b, sg_k, sg_c, si_b, si_k, sr_b, sr_n, sr_c,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = c < C
    index_at = index_ptr + b * si_b  # advanced by one entry per step (64-bit pointer arithmetic)
    grad_at = grad_ptr + b * sg_b + c * sg_c
    for _ in range(0, K):
        row = tl.load(index_at)
        dst = rows_ptr + b * sr_b + row * sr_n + c * sr_c
        v = tl.load(grad_at, mask=mask, other=0.0)
        # The same program (and lane) wrote any earlier value of this row: the read sees it.
        tl.store(dst, tl.load(dst, mask=mask, other=0.0) + v.to(rows_ptr.dtype.element_ty), mask=mask)
        index_at += si_k
        grad_at += sg_k


@triton.jit
def _batch_sum_kernel(rows_ptr, sum_ptr, B, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """sum_ptr[i] = sum_b rows_ptr[b * numel + i] (contiguous [B, numel]), in order b = 0..B-1."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    acc = tl.zeros([BLOCK], ACC)
    # The pointers advance by numel per image: no b * numel product, which overflows int32 once
    # B * numel >= 2^31 (numel alone is specialised as int32 whenever it fits).
    ptrs = rows_ptr + i
    for b in range(0, B):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        ptrs += numel
    tl.store(sum_ptr + i, _common.round_to(acc, sum_ptr.dtype.element_ty), mask=mask)


def pool_backward_triton(grad_tokens, index, num_rows, reduce_batch):
    _checks.pool_backward(grad_tokens, index, num_rows)
    _common.check_launch(OP, grad_tokens=grad_tokens, index=index)
    reference.check_pool_index(index, num_rows)
    B, K, C = grad_tokens.shape
    # Accumulated in fp32 (fp64 for fp64) and rounded once, as the reference (a copy when no index
    # repeats).
    rows = grad_tokens.new_zeros(B, num_rows, C, dtype=reference.accum_dtype(grad_tokens.dtype))
    if rows.numel() and K:
        # Wide blocks in the interpreter (one numpy op per tile op); 256 channels on a GPU, so a
        # batch gives several programs per item.
        block_c = _common.block_for(C, 1 if _backend.triton_interpreter() else 16)
        _scatter_add_rows_kernel[(B, triton.cdiv(C, block_c))](
            grad_tokens, index, rows, K, C,
            *grad_tokens.stride(), *index.stride(), *rows.stride(),
            BLOCK_C=block_c,
        )
    grad_rows = rows.to(grad_tokens.dtype)
    if not reduce_batch:
        return grad_rows, grad_tokens.new_empty(0)
    grad_sum = grad_tokens.new_empty(num_rows, C)
    numel = num_rows * C
    if numel:
        block = _common.block_for(numel, 1)
        _batch_sum_kernel[(triton.cdiv(numel, block),)](
            grad_rows, grad_sum, B, numel, ACC=_common.acc_dtype(grad_rows.dtype), BLOCK=block,
        )
    return grad_rows, grad_sum


_common.register({OP: pool_backward_triton})
