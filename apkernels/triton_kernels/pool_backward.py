"""Triton `pool_backward` (the backward of both pooling ops): grad_rows[b, n] = the sum of
grad_tokens[b, j] over the j with index[b, j] == n, in ascending j (a repeated index accumulates,
deterministically: no float atomics), and with reduce_batch the batch sum of those rows (the position
embedding gradient). Two launches, no fills or copies:

1. `_inverse_index_kernel`, one program per (image, block of rows): inv[b, n] = the one j pointing at
   row n, -1 for none, -2 for several (a compare of the rows against the index row); the image's index
   min/max (the range check, read back once); image 0 zeroes the tile counters of launch 2.
2. `_pool_backward_kernel`, one program per (tile of rows x channels, batch chunk): writes the tile of
   every image of its chunk (grad read once, rows written once) and sums them in fp32 in image order;
   with several chunks it stores that partial sum in an fp32 workspace [chunks, N, C], and the last
   program of a tile to arrive (an integer atomic counter) adds the chunks in chunk order."""
import os

import torch
import triton
import triton.language as tl

from .. import _backend, _checks, reference
from . import _common

OP = "pool_backward"

# Launch 2 aims at this many programs on a GPU: two waves of 32 one-warp programs on 132 SMs
# (H100/H200). A constant, not the device's SM count, so that the batch sum's chunks, and so its
# rounding, follow the shapes alone. APKERNELS_POOL_BACKWARD_TARGET_CTAS overrides it (tests use it to
# put several images in a chunk at small shapes).
TARGET_PROGRAMS = 2 * 132 * 32


@triton.jit
def _inverse_index_kernel(
    index_ptr, inv_ptr, minmax_ptr, counters_ptr,
    K, N, n_counters, si_b, si_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    index_b = index_ptr + b * si_b
    first_value = tl.load(index_b, mask=K > 0, other=0)
    lowest = first_value
    highest = first_value
    first = tl.full([BLOCK_R], 0, tl.int32) + K  # the smallest j pointing at the row (K: none)
    count = tl.zeros([BLOCK_R], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        j_ok = j < K
        idx = tl.load(index_b + j.to(tl.int64) * si_k, mask=j_ok, other=-1)
        lowest = tl.minimum(lowest, tl.min(tl.where(j_ok, idx, first_value), 0))
        highest = tl.maximum(highest, tl.max(tl.where(j_ok, idx, first_value), 0))
        match = (idx[None, :] == rows[:, None]) & j_ok[None, :]
        first = tl.minimum(first, tl.min(tl.where(match, j[None, :], K), 1))
        count += tl.sum(match.to(tl.int32), 1)
    inv = tl.where(count == 0, -1, tl.where(count == 1, first, -2))
    tl.store(inv_ptr + b * N + rows, inv, mask=row_ok)
    tl.store(minmax_ptr + 2 * b, lowest, mask=rb == 0)
    tl.store(minmax_ptr + 2 * b + 1, highest, mask=rb == 0)
    # Image 0's programs zero the counters (launch 2 runs after this one on the stream).
    if b == 0:
        for t0 in range(rb * BLOCK_R, n_counters, tl.num_programs(1) * BLOCK_R):
            t = t0 + tl.arange(0, BLOCK_R)
            tl.store(counters_ptr + t, tl.zeros([BLOCK_R], tl.int32), mask=t < n_counters)


@triton.jit
def _pool_backward_kernel(
    grad_ptr, index_ptr, inv_ptr, rows_ptr, sum_ptr, partial_ptr, counters_ptr,
    B, K, N, C, chunk, chunks, c_blocks,
    sg_b, sg_k, sg_c, si_b, si_k,
    REDUCE: tl.constexpr, WORKSPACE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)  # the large grid dimension (up to 2^31 - 1)
    chunk_id = tl.program_id(1)
    r = ((tile // c_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = ((tile % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    r_ok = r < N
    mask = r_ok[:, None] & (c < C)[None, :]
    offsets = r[:, None] * C + c[None, :]  # in one image of rows / in sum (contiguous [N, C])
    image_elems = tl.cast(N, tl.int64) * C  # one image of rows: a 64-bit step (N * C may pass 2^31)
    b0 = chunk_id.to(tl.int64) * chunk
    images = tl.minimum(B - b0, chunk)
    # Per-image pointers advance by one image per step: 64-bit pointer arithmetic, no b * (N * C).
    grad_b = grad_ptr + b0 * sg_b
    index_b = index_ptr + b0 * si_b
    inv_b = inv_ptr + b0 * N
    rows_b = rows_ptr + b0 * N * C
    total = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for _ in range(0, images):
        slot = tl.load(inv_b + r, mask=r_ok, other=-1)
        v = tl.load(grad_b + slot.to(tl.int64)[:, None] * sg_k + c[None, :] * sg_c,
                    mask=mask & (slot >= 0)[:, None], other=0.0)
        if tl.min(slot, 0) == -2:  # a repeated row in the tile: sum its j in ascending order
            acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
            index_at = index_b
            grad_at = grad_b + c[None, :] * sg_c
            for _j in range(0, K):
                row = tl.load(index_at)
                acc += tl.load(grad_at, mask=mask & (r == row)[:, None], other=0.0).to(ACC)
                index_at += si_k
                grad_at += sg_k
            v = tl.where((slot == -2)[:, None], _common.round_to(acc, rows_ptr.dtype.element_ty), v)
        tl.store(rows_b + offsets, v, mask=mask)
        if REDUCE:
            total += v.to(ACC)
        grad_b += sg_b
        index_b += si_b
        inv_b += N
        rows_b += image_elems
    if REDUCE:
        if WORKSPACE:
            tl.store(partial_ptr + chunk_id.to(tl.int64) * N * C + offsets, total, mask=mask)
            tl.debug_barrier()  # every thread's partial is stored before the program counts itself
            if tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel") == chunks - 1:
                s = tl.zeros([BLOCK_R, BLOCK_C], ACC)
                at = partial_ptr + offsets
                for _k in range(0, chunks):
                    s += tl.load(at, mask=mask, other=0.0, volatile=True)
                    at += image_elems
                tl.store(sum_ptr + offsets, _common.round_to(s, sum_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(sum_ptr + offsets, _common.round_to(total, sum_ptr.dtype.element_ty), mask=mask)


def _target_programs() -> int:
    return int(os.environ.get("APKERNELS_POOL_BACKWARD_TARGET_CTAS", TARGET_PROGRAMS))


def pool_backward_triton(grad_tokens, index, num_rows, reduce_batch):
    _checks.pool_backward(grad_tokens, index, num_rows)
    _common.check_launch(OP, grad_tokens=grad_tokens, index=index)
    B, K, C = grad_tokens.shape
    N = num_rows
    rows = grad_tokens.new_empty(B, N, C)
    grad_sum = grad_tokens.new_empty(N, C) if reduce_batch else grad_tokens.new_empty(0)
    if B == 0 or N * C == 0:
        if reduce_batch:
            grad_sum.zero_()  # a sum over no images (or an empty tensor)
        return rows, grad_sum
    interpreter = _backend.triton_interpreter()
    # One warp per program on a GPU: a row segment of 128 fp32 channels (16 bytes per lane) or of
    # 64 fp16/bf16 channels (4 bytes per lane: twice the tiles, so half the chunks and half the
    # batch-sum workspace for the same waves); wide tiles in the interpreter (one numpy op per tile op).
    element_bytes = grad_tokens.element_size()
    block_c = _common.block_for(C, 1) if interpreter else min(128 if element_bytes == 4 else 64, _common.next_pow2(C))
    block_r = _common.block_for(N, block_c) if interpreter else 1
    c_blocks = triton.cdiv(C, block_c)
    tiles = triton.cdiv(N, block_r) * c_blocks
    chunks = min(B, 65535, max(1, triton.cdiv(_target_programs(), tiles)))
    if reduce_batch and "APKERNELS_POOL_BACKWARD_TARGET_CTAS" not in os.environ:
        # The fp32 workspace (8 * N * C bytes per chunk, written and read once) stays within 1/20 of
        # the backward's minimal bytes: a small batch gets fewer chunks rather than a large workspace.
        chunks = max(1, min(chunks, B * (K + N) * element_bytes // (20 * 8 * N)))
    chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, chunk)
    workspace = reduce_batch and chunks > 1
    acc = _common.acc_dtype(grad_tokens.dtype)
    ints = index.new_empty(B * N + (tiles if workspace else 0), dtype=torch.int32)
    inv, counters = ints[: B * N], ints[B * N:]
    minmax = index.new_empty(B, 2)
    block_k = min(_common.next_pow2(K), 64 if interpreter else 32) if K else 1
    block_ri = _common.block_for(N, block_k) if interpreter else 32
    _inverse_index_kernel[(B, triton.cdiv(N, block_ri))](
        index, inv, minmax, counters, K, N, counters.numel(), *index.stride(),
        BLOCK_R=block_ri, BLOCK_K=block_k,
    )
    partial = grad_tokens.new_empty(chunks, N, C, dtype=reference.accum_dtype(grad_tokens.dtype)) if workspace else rows
    _pool_backward_kernel[(tiles, chunks)](
        grad_tokens, index, inv, rows, grad_sum if reduce_batch else rows, partial, counters if workspace else inv,
        B, K, N, C, chunk, chunks, c_blocks, *grad_tokens.stride(), *index.stride(),
        REDUCE=reduce_batch, WORKSPACE=workspace, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4 if interpreter else 1,
    )
    if K:
        check_index_range(minmax, N)
    return rows, grad_sum


def check_index_range(minmax, num_rows):
    """The range check on the per-image (min, max) of the index written by launch 1: one [B, 2] copy
    to the host, which waits for the launches (the kernels never touch a row outside [0, num_rows))."""
    pairs = minmax.tolist()
    lowest, highest = min(p[0] for p in pairs), max(p[1] for p in pairs)
    if lowest < 0 or highest >= num_rows:
        raise RuntimeError(f"pool_backward: index must be in [0, {num_rows}) (num_rows), got "
                           f"{lowest if lowest < 0 else highest}")


_common.register({OP: pool_backward_triton})
