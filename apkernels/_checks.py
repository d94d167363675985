"""Argument checks of the ops, once per call: the public functions (`apkernels.<op>`) and the fake
kernels validate with these, the Triton launchers and the reference fallbacks of the backward ops
too. Errors are ValueErrors that name the argument and say what was expected, in the words of the
compiled kernels' guards for direct torch.ops calls (csrc/ops/*_checks.h; only dtypes are spelt
differently, torch.float32 for Float): tests/test_registry.py compares the two.
"""
import math

import torch

from . import reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape(t) -> str:
    """A shape as the C++ guards print it: [2, 3]."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(op: str, name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {shape(t)}")


def check_like(op: str, name: str, t, ref_name: str, ref, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_nonempty(op: str, name: str, t, dims: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty ({dims} >= 1), got shape {shape(t)}")


def check_keep(op: str, keep, low: int, high: int, what: str) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, torch.SymInt)):
        raise ValueError(f"{op}: keep must be an int, got {type(keep).__name__}")
    if not (low <= keep <= high):
        raise ValueError(f"{op}: keep must be in [{low}, {high}] ({what}), got {keep}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(choices)}; got {value!r}")


def check_scale(op: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float, got {scale!r}")


# --- one validator per op ---------------------------------------------------------------------------


def patch_pool(x, keep, pos, score) -> None:
    op = "patch_pool"
    check_tensor(op, "x", x, 4, "[B, C, H, W]")
    check_nonempty(op, "x", x, "B, C, H, W")
    B, C, H, W = x.shape
    N = H * W
    check_keep(op, keep, 1, N, "1 to the number of positions H*W")
    if pos is not None:
        check_tensor(op, "pos", pos, pos.dim() if isinstance(pos, torch.Tensor) else 2, "[H*W, C]")
        if tuple(pos.shape) not in ((N, C), (1, N, C)):
            raise ValueError(f"{op}: pos must have shape [{N}, {C}] or [1, {N}, {C}] (H*W, C), got {shape(pos)}")
        check_like(op, "pos", pos, "x", x)
    check_choice(op, "score", score, reference.PATCH_SCORES)


def token_pool(x, q, k, keep, scale, score) -> None:
    op = "token_pool"
    check_tensor(op, "x", x, 3, "[B, N, C]")
    check_nonempty(op, "x", x, "B, N, C")
    B, N, C = x.shape
    if N < 2:
        raise ValueError(f"{op}: x must hold the CLS token and at least one patch token (N >= 2), got N={N}")
    check_tensor(op, "q", q, 4, "[B, heads, N, head_dim]")
    check_tensor(op, "k", k, 4, "[B, heads, N, head_dim]")
    if k.shape[0] != B or k.shape[2] != N or k.shape[1] < 1 or k.shape[3] < 1:
        raise ValueError(f"{op}: k must have shape [{B}, heads, {N}, head_dim] (B, N of x), got {shape(k)}")
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"{op}: q must have the same shape as k {shape(k)}, got {shape(q)}")
    check_like(op, "q", q, "x", x, dtype=False)
    check_like(op, "k", k, "q", q)
    check_keep(op, keep, 1, N - 1, "1 to the number of patch tokens N-1")
    check_scale(op, scale)
    check_choice(op, "score", score, reference.TOKEN_SCORES)


def pool_backward(grad_tokens, index, num_rows) -> None:
    """Shapes and dtypes; the index values are checked by reference.check_pool_index."""
    op = "pool_backward"
    check_tensor(op, "grad_tokens", grad_tokens, 3, "[B, K, C]")
    B, K, _ = grad_tokens.shape
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long:
        raise ValueError(f"{op}: index must be int64, got {getattr(index, 'dtype', type(index).__name__)}")
    check_like(op, "index", index, "grad_tokens", grad_tokens, dtype=False)
    if tuple(index.shape) != (B, K):
        raise ValueError(f"{op}: index must have shape [{B}, {K}] (B, K of grad_tokens), got {shape(index)}")
    if num_rows < 0:
        raise ValueError(f"{op}: num_rows must be >= 0, got {num_rows}")


def dan_spatial_pool(x, z) -> None:
    op = "dan_spatial_pool"
    check_tensor(op, "x", x, 4, "[B, C, H, W]")
    check_nonempty(op, "x", x, "B, C, H, W")
    check_tensor(op, "z", z, 5, "[B, heads, C2, H, W]")
    check_nonempty(op, "z", z, "B, heads, C2, H, W")
    B, _, H, W = x.shape
    if z.shape[0] != B or tuple(z.shape[3:]) != (H, W):
        raise ValueError(f"{op}: z must have shape [{B}, heads, C2, {H}, {W}] (B, H, W of x), got {shape(z)}")
    check_like(op, "z", z, "x", x)


def dan_head_fusion(g, gate_logits) -> None:
    op = "dan_head_fusion"
    check_tensor(op, "g", g, 3, "[B, heads, C]")
    check_nonempty(op, "g", g, "B, heads, C")
    check_tensor(op, "gate_logits", gate_logits, 3, "[B, heads, C]")
    if tuple(gate_logits.shape) != tuple(g.shape):
        raise ValueError(f"{op}: gate_logits must have the shape of g {shape(g)}, got {shape(gate_logits)}")
    check_like(op, "gate_logits", gate_logits, "g", g)
