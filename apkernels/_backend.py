"""Backend choice: "auto" | "cuda" | "triton" | "cpu" | "reference".

"auto" picks the fastest backend that can run on the tensors' device: on CUDA tensors the compiled
CUDA kernels, else Triton, else the reference; on CPU tensors the compiled CPU kernels, else the
reference. The environment variable APKERNELS_BACKEND replaces "auto" as the default.

Each concrete backend has one availability function in `AVAILABILITY` (op, device) -> None when it
can run, else the reason; a new backend (or a new way to run one) plugs in there.
"""
import os

import torch

from . import _emulation, _extension, _library

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "APKERNELS_BACKEND"

# Ops whose Triton kernels were registered, backward ops included (filled by
# apkernels.triton_kernels on import).
TRITON_OPS: set = set()
TRITON_IMPORT_ERROR = None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_reason(backend: str):
    def reason(op: str, device: torch.device):
        if device.type != backend:
            return f"the '{backend}' backend runs on {backend} tensors, got tensors on {device}"
        if _extension._C is None:
            return f"the compiled extension apkernels._C is not available ({_extension.LOAD_ERROR})"
        if op not in _extension.NATIVE[backend.upper()]:
            return f"apkernels._C was built without a {backend} kernel for {op}"
        return None

    return reason


def _triton_reason(op: str, device: torch.device):
    if op not in TRITON_OPS:
        why = f" ({TRITON_IMPORT_ERROR})" if TRITON_IMPORT_ERROR else ""
        return f"no Triton kernel is registered for {op}{why}"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
        return None
    return f"Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got {device}"


def _cuda_reason(op: str, device: torch.device):
    """The CUDA kernels: on CUDA tensors, or on CPU tensors from the emulation build."""
    if device.type != "cpu":
        return _native_reason("cuda")(op, device)
    if _emulation.available(op):
        return None  # the CUDA source on the CPU emulator (tests; "auto" never picks it)
    why = _emulation.LOAD_ERROR or f"no emulated kernel for {op}"
    return (
        "the 'cuda' backend runs on CUDA tensors, or on CPU tensors with the CUDA emulation build "
        f"(APKERNELS_CUDA_EMULATION=1: {why}), got {device}"
    )


# backend -> (op, device) -> None when it can run `op` on `device`, else why not.
AVAILABILITY = {
    "cuda": _cuda_reason,
    "triton": _triton_reason,
    "cpu": _native_reason("cpu"),
    "reference": lambda op, device: None,
}

# The backends "auto" tries on each device type, in order (the reference when none can run).
# Triton on the CPU is the slow interpreter: only when asked for.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}

# dtypes the GPU backends (CUDA, Triton) implement; "auto" sends anything else to the reference.
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def op_suffix(backend: str, device: torch.device) -> str:
    """The suffix of the `torch.ops.apkernels` op that runs a resolved backend on `device`."""
    if backend == "triton":
        return _library.TRITON_SUFFIX
    if backend == "cuda" and device.type == "cpu":
        return _library.EMULATED_SUFFIX
    return ""


def _unavailable_reason(op: str, backend: str, device: torch.device):
    """None when `backend` can run `op` on `device`, else why not."""
    check = AVAILABILITY.get(backend)
    if check is None:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    return check(op, device)


def available(op: str, backend: str, device) -> bool:
    return _unavailable_reason(op, backend, torch.device(device)) is None


def available_backends(op: str, device) -> list:
    """The concrete backends that can run `op` on `device`, fastest first."""
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "triton", "cuda", "reference")
    return [b for b in order if available(op, b, device)]


def resolve(op: str, backend, device: torch.device, dtype: torch.dtype | None = None) -> str:
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, ())
        if device.type == "cuda" and dtype is not None and dtype not in GPU_DTYPES:
            order = ()
        for candidate in order:
            if _unavailable_reason(op, candidate, device) is None:
                return candidate
        return "reference"
    reason = _unavailable_reason(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"apkernels.{op}: backend={backend!r} is not available: {reason}")
    return backend
