"""Helpers shared by the Triton kernels: device/dtype checks, block sizes, registration and the top-k
selection (one packed int64 key per position, sorted with `tl.sort`)."""
import functools

import torch
import triton
import triton.language as tl

from .. import _backend, _library

# Elements per register tile: the interpreter runs one numpy op per tile op, so larger tiles are
# much faster there; on a GPU 4096 fp32 keeps a tile in registers at 4 warps.
TILE_ELEMENTS_GPU = 4096
TILE_ELEMENTS_INTERPRETER = 1 << 16

# Dtypes the Triton kernels take; float64 only where the kernel accumulates in the input dtype.
HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def tile_elements() -> int:
    return TILE_ELEMENTS_INTERPRETER if _backend.triton_interpreter() else TILE_ELEMENTS_GPU


def block_for(extent: int, other_block: int) -> int:
    """Power-of-two block over `extent` so that block * other_block fits one tile (at least 1)."""
    return max(1, min(next_pow2(extent), tile_elements() // max(other_block, 1)))


def warps_for(n_pad: int) -> int:
    """Warps for a program that holds (and sorts) an n_pad-long row: more for large maps so the
    sort's registers per thread stay bounded."""
    return min(16, max(4, n_pad // 256))


def warps_for_tile(tile_elements: int) -> int:
    """Warps for a program whose largest register tile has `tile_elements` elements: at most 8 per
    thread (no spills with int64 addresses), between 4 and 16 warps."""
    return min(16, max(4, tile_elements // (8 * 32)))


def check_launch(op: str, **tensors) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors in the interpreter (TRITON_INTERPRET=1)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and _backend.triton_interpreter():
            continue
        raise RuntimeError(
            f"{op}_triton: {name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set "
            f"before importing apkernels), got a tensor on {t.device}"
        )


def on_tensor_device(launcher):
    """`launcher` run with its first tensor argument's CUDA device current: Triton launches on the
    current device, so tensors on a second GPU would otherwise run on (and read through) the first."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return guarded


def check_dtype(op: str, name: str, t, dtypes) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}_triton: {name} must be one of {names} for the Triton backend, got {t.dtype}")


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: fp32, or fp64 for fp64 inputs (as reference.accum_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def register(kernels: dict) -> None:
    """Register {op name: launcher} as CPU and CUDA kernels of `apkernels::<name>_triton` and mark
    those ops available on the Triton backend."""
    for name, fn in kernels.items():
        _library.register_kernel(name + _library.TRITON_SUFFIX, on_tensor_device(fn))
        _backend.TRITON_OPS.add(name)


# --- top-k selection ------------------------------------------------------------------------------


@triton.jit
def order_key(scores):
    """int32 image of fp32 scores whose signed order is torch.sort's: NaN above +inf, -0.0 == 0.0
    (every real score above -2^31)."""
    s = tl.where(scores == 0, 0.0, scores)  # -0.0 -> +0.0
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-int order == float order
    return tl.where(s != s, 0x7FFFFFFF, key)  # every NaN (either sign) above +inf


@triton.jit
def select_topk(scores, pos, valid, K, N_PAD: tl.constexpr):
    """The `K` best of `scores` (fp32, [N_PAD], `valid` marks the real positions `pos`): returns
    (selected mask, output slot of each selected position in ascending position order).

    Order = torch.sort(descending=True, stable=True): larger score first, ties to the lower
    position, NaN above +inf, -0.0 == 0.0. Each position gets one int64 key (monotone integer image
    of its fp32 score << 32 | inverted position), all keys are distinct, so the K-th largest key is
    a threshold that selects exactly K positions.
    """
    key = tl.where(valid, order_key(scores), -2147483648)  # padding below -inf: never selected
    packed = (key.to(tl.int64) << 32) | (N_PAD - 1 - pos).to(tl.int64)
    # Ascending sort of the complement = descending order of the keys (tl.sort's default order
    # on every Triton version we support).
    inverted = ~packed
    ordered = tl.sort(inverted)
    threshold = tl.sum(tl.where(tl.arange(0, N_PAD) == K - 1, ordered, 0), 0)
    selected = inverted <= threshold
    slot = tl.cumsum(selected.to(tl.int32), 0) - 1
    return selected, slot


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32/fp64 `v` rounded to `dtype`, to nearest even. Done by hand for bfloat16 because the
    interpreter's own fp32 -> bf16 cast truncates (the GPU's rounds to nearest even: same result)."""
    if dtype == tl.bfloat16:
        v = v.to(tl.float32)
        bits = v.to(tl.int32, bitcast=True)
        bits = tl.where(v != v, 0x7FC00000, bits)  # a quiet NaN must not round into inf
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


# --- top-k selection over a row too long for registers: keys in global memory, radix select ------


@triton.jit
def store_keys(keys_ptr, scores, pos, valid):
    """keys_ptr[pos] = one distinct int64 key per position: order_key(score) << 32, then the lower
    position first (the order of select_topk)."""
    packed = (order_key(scores).to(tl.int64) << 32) | (0x7FFFFFFF - pos).to(tl.int64)
    tl.store(keys_ptr + pos, packed, mask=valid)


@triton.jit
def radix_threshold(keys_ptr, N, K, BLOCK: tl.constexpr):
    """(prefix, mask) such that the K largest of the N distinct int64 keys at keys_ptr (written by
    store_keys, visible to the whole program) are exactly those with (key & mask) >= prefix.

    Radix select, 8 bits per pass from the most significant byte: a histogram of the digit of the
    keys that still match the prefix, the bin holding the K-th largest, and no further pass once
    that bin's keys are all selected (typically after the 4 score bytes; keys are distinct, so at
    the latest after 8). Each pass reads the N keys in BLOCK-sized tiles."""
    bins = tl.arange(0, 512)  # 256 digits + one bin (256) for keys that do not match the prefix
    digit_bin = bins < 256
    offs = tl.arange(0, BLOCK)
    zero = tl.program_id(0) * 0
    prefix = zero.to(tl.int64)
    mask = zero.to(tl.int64)
    k_rem = zero + K  # keys among those matching `prefix` still to be selected
    done = zero
    for shift in tl.static_range(56, -1, -8):
        if done == 0:
            hist = tl.zeros([512], tl.int32)
            for p0 in range(0, N, BLOCK):
                p = p0 + offs
                in_row = p < N
                key = tl.load(keys_ptr + p, mask=in_row, other=0)
                if shift == 56:  # the sign byte: signed order
                    digit = ((key >> 56) + 128).to(tl.int32)
                else:
                    digit = ((key >> shift) & 255).to(tl.int32)
                digit = tl.where(in_row & ((key & mask) == prefix), digit, 256)
                hist += tl.histogram(digit, 512)
            h = tl.where(digit_bin, hist, 0)
            above = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys in higher bins
            hit = digit_bin & (above < k_rem) & (above + h >= k_rem)  # exactly one bin
            d = tl.sum(tl.where(hit, bins, 0), 0)
            count = tl.sum(tl.where(hit, h, 0), 0)
            k_rem -= tl.sum(tl.where(hit, above, 0), 0)
            if shift == 56:
                prefix = prefix | ((d - 128).to(tl.int64) << 56)
            else:
                prefix = prefix | (d.to(tl.int64) << shift)
            mask = ~(((zero + 1).to(tl.int64) << shift) - 1)
            done = (count == k_rem).to(tl.int32)
    return prefix, mask


@triton.jit
def tile_selection(keys_ptr, pos, valid, prefix, mask, written):
    """(selected, slot) for a tile of positions `pos`: kept by radix_threshold's (prefix, mask);
    slots in ascending position order, after the `written` positions kept in earlier tiles."""
    key = tl.load(keys_ptr + pos, mask=valid, other=0)
    selected = valid & ((key & mask) >= prefix)
    return selected, written + tl.cumsum(selected.to(tl.int32), 0) - 1
