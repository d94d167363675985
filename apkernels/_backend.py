"""Backend choice: "auto" | "cuda" | "triton" | "cpu" | "reference".

"auto" picks the fastest backend that can run on the tensors' device: on CUDA tensors the compiled
CUDA kernels, else Triton, else the reference; on CPU tensors the compiled CPU kernels, else the
reference. The environment variable APKERNELS_BACKEND replaces "auto" as the default.
"""
import os

import torch

from . import _emulation, _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "APKERNELS_BACKEND"

# Ops whose Triton kernels were registered (filled by apkernels.triton_kernels on import).
TRITON_OPS: set = set()
TRITON_IMPORT_ERROR = None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(op: str, backend: str, device: torch.device):
    """None when `backend` can run `op` on `device`, else why not."""
    if backend == "reference":
        return None
    if backend == "cuda" and device.type == "cpu":
        if _emulation.available(op):
            return None  # the CUDA source on the CPU emulator (tests; "auto" never picks it)
        return (
            "the 'cuda' backend runs on CUDA tensors, or on CPU tensors with the CUDA emulation build "
            f"(APKERNELS_CUDA_EMULATION=1: {_emulation.LOAD_ERROR or 'no emulated kernel for ' + op}), got {device}"
        )
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"the '{backend}' backend runs on {backend} tensors, got tensors on {device}"
        if _extension._C is None:
            return f"the compiled extension apkernels._C is not available ({_extension.LOAD_ERROR})"
        if op not in _extension.NATIVE[backend.upper()]:
            return f"apkernels._C was built without a {backend} kernel for {op}"
        return None
    if backend == "triton":
        if op not in TRITON_OPS:
            why = f" ({TRITON_IMPORT_ERROR})" if TRITON_IMPORT_ERROR else ""
            return f"no Triton kernel is registered for {op}{why}"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
            return None
        return f"Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got {device}"
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def available(op: str, backend: str, device) -> bool:
    return _unavailable_reason(op, backend, torch.device(device)) is None


def available_backends(op: str, device) -> list:
    """The concrete backends that can run `op` on `device`, fastest first."""
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "triton", "cuda", "reference")
    return [b for b in order if available(op, b, device)]


# dtypes the GPU backends (CUDA, Triton) implement; "auto" sends anything else to the reference.
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def op_suffix(backend: str, device: torch.device) -> str:
    """The suffix of the `torch.ops.apkernels` op that runs a resolved backend on `device`."""
    if backend == "triton":
        return "_triton"
    if backend == "cuda" and device.type == "cpu":
        return _emulation.SUFFIX
    return ""


def resolve(op: str, backend, device: torch.device, dtype: torch.dtype | None = None) -> str:
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            order = ("cuda", "triton") if dtype is None or dtype in GPU_DTYPES else ()
        else:
            order = ("cpu",)  # Triton on the CPU is the slow interpreter: only when asked for
        for candidate in order:
            if _unavailable_reason(op, candidate, device) is None:
                return candidate
        return "reference"
    reason = _unavailable_reason(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"apkernels.{op}: backend={backend!r} is not available: {reason}")
    return backend
