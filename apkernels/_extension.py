"""Load the compiled extension and record which ops it implements natively (CPU / CUDA).

Missing kernels fall back to the pure-PyTorch reference so that ``torch.ops.apkernels.*`` always
runs; ``apkernels.available_backends`` reports what is really compiled.
"""
import importlib.util
import json
import os
import warnings

import torch

from . import _library

_C = None
LOAD_ERROR = None
try:
    from . import _C  # noqa: F811  (registers TORCH_LIBRARY_IMPL kernels on import)
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc if importlib.util.find_spec(f"{__package__}._C") else "it has not been built"

# Ops with compiled kernels, per dispatch key (checked before any Python fallback is registered).
NATIVE = {
    key: frozenset(name for name in _library.SCHEMAS if _library.has_kernel(name, key))
    for key in ("CPU", "CUDA")
}


def build_config() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _warn_once() -> None:
    if os.environ.get("APKERNELS_QUIET") == "1":
        return
    if _C is None:
        warnings.warn(
            f"apkernels: the compiled extension apkernels._C could not be loaded ({LOAD_ERROR}); "
            "the CPU/CUDA kernels are unavailable and torch.ops.apkernels.* run on the PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif torch.cuda.is_available() and not NATIVE["CUDA"]:
        warnings.warn(
            "apkernels: apkernels._C was built without CUDA kernels; on CUDA tensors the ops use the "
            "Triton backend where available, else the PyTorch reference. Rebuild with nvcc on PATH "
            "(APKERNELS_CUDA=1) to get them.",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_once()
