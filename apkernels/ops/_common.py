"""Argument checks shared by the ops (errors name the argument and say what was expected)."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_like(op: str, name: str, t, ref_name: str, ref, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_nonempty(op: str, name: str, t, dims: str) -> None:
    """Every dimension but the batch (dim 0) must be >= 1: an empty batch gives empty outputs."""
    if 0 in t.shape[1:]:
        raise ValueError(
            f"{op}: {name} must not be empty ({dims} >= 1; the batch B may be 0), got shape {tuple(t.shape)}"
        )


def check_keep(op: str, keep, low: int, high: int, what: str) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, torch.SymInt)):
        raise ValueError(f"{op}: keep must be an int, got {type(keep).__name__}")
    if not (low <= keep <= high):
        raise ValueError(f"{op}: keep must be in [{low}, {high}] ({what}), got {keep}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")


def check_scale(op: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float, got {scale!r}")
