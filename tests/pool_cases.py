"""Cases and helpers shared by the pooling tests (patch_pool, token_pool, pool_backward, properties)."""
from dataclasses import dataclass

import pytest
import torch

from apkernels import _backend
from tests.utils import TOL, backend_params, dtypes_for, interpreted, small_ints


def op_for(name: str, backend: str, device):
    """The op a backend runs on `device`: `<name>_triton` for Triton, the native op (CPU/CUDA
    kernels) otherwise; "cuda" on CPU tensors is the emulated CUDA build `<name>_cuda_emulated`."""
    return getattr(torch.ops.apkernels, name + _backend.op_suffix(backend, torch.device(device)))


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def assert_valid_index(index, keep, low, high):
    """Every row: `keep` unique positions in [low, high), ascending."""
    assert index.dtype == torch.int64 and index.shape[-1] == keep
    assert bool((index >= low).all()) and bool((index < high).all())
    assert bool((index[..., 1:] > index[..., :-1]).all()), "kept positions must be strictly ascending"


def assert_same_selection(index, expected, scores, dtype):
    """index == the reference's. With scores that are not exact in every summation order (random
    floats), a swap is accepted only between positions whose reference scores equal the boundary
    (k-th) score within the dtype's rounding; exact inputs (small_ints) must match bit for bit."""
    if torch.equal(index, expected):
        return
    atol, rtol = TOL[dtype]
    for b in range(index.shape[0]):
        got, want = set(index[b].tolist()), set(expected[b].tolist())
        if got == want:
            continue
        kth = scores[b, expected[b]].min()
        for p in got ^ want:
            assert abs(scores[b, p] - kth) <= 10 * (atol + rtol * abs(kth)), (
                f"batch {b}: position {p} (score {scores[b, p]}) swapped with the k-th score {kth}"
            )


@dataclass(frozen=True)
class PatchCase:
    name: str
    B: int
    C: int
    H: int
    W: int
    keep: int
    pos: str = "none"  # "none" | "2d" ([N, C]) | "3d" ([1, N, C])
    channels_last: bool = False
    big: bool = False  # skipped in the Triton interpreter

    @property
    def N(self):
        return self.H * self.W


PATCH_CASES = [
    PatchCase("paper", 2, 768, 14, 14, 160, pos="3d", big=True),
    PatchCase("paper_channels_last", 2, 768, 14, 14, 160, pos="2d", channels_last=True, big=True),
    PatchCase("b1_keep1", 1, 5, 3, 3, 1, pos="2d"),
    PatchCase("n1", 2, 7, 1, 1, 1, pos="3d"),
    PatchCase("keep_all", 2, 6, 3, 5, 15, pos="2d"),
    PatchCase("odd_c_n", 3, 13, 5, 7, 11, pos="3d"),
    PatchCase("odd_channels_last", 2, 19, 3, 5, 6, channels_last=True),
    PatchCase("wide_row", 2, 3, 1, 9, 4, pos="2d"),
]


def patch_inputs(case: PatchCase, dtype, device, seed=0, ints=True):
    """(x, pos) for a case; small_ints make every score exact, so selections must match exactly."""
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: small_ints(*s, dtype=dtype, device=device, generator=g)) if ints else (
        lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    )
    x = make(case.B, case.C, case.H, case.W)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pos = None
    if case.pos == "2d":
        pos = make(case.N, case.C)
    elif case.pos == "3d":
        pos = make(1, case.N, case.C)
    return x, pos


@dataclass(frozen=True)
class TokenCase:
    name: str
    B: int
    N: int  # tokens, CLS included
    C: int
    heads: int
    D: int
    keep: int
    qkv_view: bool = True  # q, k as strided views of a [B, N, 3, heads, D] tensor
    big: bool = False


TOKEN_CASES = [
    TokenCase("paper", 2, 161, 768, 8, 96, 144, big=True),
    TokenCase("paper_contiguous_qk", 2, 161, 768, 8, 96, 144, qkv_view=False, big=True),
    TokenCase("b1_keep1", 1, 6, 5, 2, 3, 1),
    TokenCase("n2", 2, 2, 7, 1, 5, 1),
    TokenCase("keep_all", 2, 9, 6, 3, 4, 8),
    TokenCase("odd_sizes", 3, 23, 13, 3, 17, 10),
    TokenCase("contiguous_qk", 2, 12, 9, 2, 7, 5, qkv_view=False),
    # More images than the emulated GPU's persistent CTAs (2 per SM x 4 SMs), 5 heads (a partial
    # chunk of the CUDA kernel's 4), head rows of 64 / 32 packs (two per lane in fp32), rows of 1040
    # channels (16-byte copies in whole steps of 4 packs per lane plus a remainder).
    TokenCase("wide_rows_many_images", 9, 21, 1040, 5, 256, 7),
]


def token_inputs(case: TokenCase, dtype, device, seed=0, ints=True, qk_dtype=None):
    g = torch.Generator().manual_seed(seed)
    qk_dtype = qk_dtype or dtype
    make = (lambda *s, dt: small_ints(*s, dtype=dt, device=device, generator=g)) if ints else (
        lambda *s, dt: torch.randn(*s, generator=g).to(device=device, dtype=dt)
    )
    x = make(case.B, case.N, case.C, dt=dtype)
    if case.qkv_view:
        qkv = make(case.B, case.N, 3, case.heads, case.D, dt=qk_dtype).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
    else:
        q = make(case.B, case.heads, case.N, case.D, dt=qk_dtype)
        k = make(case.B, case.heads, case.N, case.D, dt=qk_dtype)
    return x, q, k


def skip_big(case, device, backend):
    if case.big and interpreted(device, backend):
        pytest.skip("paper-scale shapes are left to the compiled backends (Triton interpreter)")


def case_params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


def backend_dtype_params(op):
    """pytest params (device, backend, dtype): every fast backend that runs `op` here, with each
    dtype it supports (tests.utils.dtypes_for)."""
    params = []
    for p in backend_params(op):
        device, backend = p.values
        for dtype in dtypes_for(backend) if backend is not None else [torch.float32]:
            params.append(pytest.param(device, backend, dtype, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}"))
    return params


def scores_to_check(scores, dtype, device, backend):
    """Every score name, except in the (slow) Triton interpreter where the dtypes other than fp32
    check the default score only: the score logic is dtype-independent, fp32 covers it."""
    return scores if dtype == torch.float32 or not interpreted(device, backend) else scores[:1]
