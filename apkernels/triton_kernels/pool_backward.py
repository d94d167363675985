"""Triton `pool_backward` (the backward of both pooling ops): scatter grad_tokens [B, K, C] into
zero rows [B, num_rows, C] at index, then (reduce_batch) the batch sum of those rows - the position
embedding gradient - as a fixed-order loop over the batch, so it is deterministic (no atomics)."""
import torch
import triton
import triton.language as tl

from . import _common

OP = "pool_backward"


@triton.jit
def _scatter_rows_kernel(
    grad_ptr, index_ptr, rows_ptr,
    K, C, num_rows,
    sg_b, sg_k, sg_c, si_b, si_k, sr_b, sr_n, sr_c,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = k < K
    rows = tl.load(index_ptr + b * si_b + k.to(tl.int64) * si_k, mask=in_k, other=0)
    # An index outside [0, num_rows) is dropped rather than written out of bounds (the pooling ops
    # only produce valid ones; checking on the host would cost a device sync per backward).
    in_k = in_k & (rows >= 0) & (rows < num_rows)
    channels = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + channels).to(tl.int64)
        mask = in_k[:, None] & (c < C)[None, :]
        v = tl.load(grad_ptr + b * sg_b + k.to(tl.int64)[:, None] * sg_k + c[None, :] * sg_c, mask=mask)
        tl.store(rows_ptr + b * sr_b + rows[:, None] * sr_n + c[None, :] * sr_c, v, mask=mask)


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
    _common.check_launch(OP, grad_tokens=grad_tokens, index=index)
    if grad_tokens.dim() != 3 or index.shape != grad_tokens.shape[:2] or index.dtype != torch.long:
        raise ValueError(
            f"{OP}_triton: expected grad_tokens [B, K, C] and int64 index [B, K], got "
            f"{tuple(grad_tokens.shape)} and {tuple(index.shape)} {index.dtype}"
        )
    B, K, C = grad_tokens.shape
    grad_rows = grad_tokens.new_zeros(B, num_rows, C)
    block_c = _common.block_for(C, 1)
    block_k = _common.block_for(K, block_c)
    if grad_rows.numel() and K:
        _scatter_rows_kernel[(B, triton.cdiv(K, block_k))](
            grad_tokens, index, grad_rows, K, C, num_rows,
            *grad_tokens.stride(), *index.stride(), *grad_rows.stride(),
            BLOCK_K=block_k, BLOCK_C=block_c,
        )
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


# No forward op of its own: patch_pool / token_pool import this module before registering.
_common._library.register_kernel(OP + _common._library.TRITON_SUFFIX, _common.on_tensor_device(pool_backward_triton))
