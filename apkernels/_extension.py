"""Load the compiled extension and record which ops it implements natively (CPU / CUDA).

Missing kernels fall back to the pure-PyTorch reference so that ``torch.ops.apkernels.*`` always
runs; ``apkernels.available_backends`` reports what is really compiled, and ``build_problems()``
says what a complete build should have but this one lacks (the build check of ``make`` and CI).
"""
import importlib.util
import json
import os
import shutil
import sys
import warnings

import torch

from . import _library

REBUILD_HINT = (
    "rebuild it against this torch: `pip install --no-deps --force-reinstall --no-cache-dir .` "
    "(or `pip install -e .`) in the apkernels source tree"
)


def build_config() -> dict:
    """What the build recorded in _build_config.json (written by build_ext only); {} if absent."""
    path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _built_for_other_torch() -> str | None:
    built_for = build_config().get("torch")
    if built_for and built_for != torch.__version__:
        return built_for
    return None


_C = None
LOAD_ERROR = None
OTHER_TORCH = _built_for_other_torch()
if OTHER_TORCH is not None:
    # Loading a _C built for another torch may fail on a missing symbol or, worse, load and crash:
    # leave it unloaded and run on the fallbacks.
    LOAD_ERROR = f"it was built for torch {OTHER_TORCH}, not the installed {torch.__version__}"
else:
    try:
        from . import _C  # noqa: F811  (registers TORCH_LIBRARY_IMPL kernels on import)
    except ImportError as exc:  # not built, or built against another torch
        LOAD_ERROR = exc if importlib.util.find_spec(f"{__package__}._C") else "it has not been built"

# Ops with compiled kernels, per dispatch key (checked before any Python fallback is registered).
NATIVE = {
    key: frozenset(name for name in _library.SCHEMAS if _library.has_kernel(name, key))
    for key in ("CPU", "CUDA")
}


def cuda_kernels_expected() -> bool:
    """A CUDA torch and nvcc are present and the build was not deliberately CPU-only (APKERNELS_CUDA=0)."""
    opted_out = build_config().get("APKERNELS_CUDA") == "0"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None and not opted_out


def build_problems() -> list:
    """What is missing from this build, one sentence each; [] for a complete build."""
    if _C is None:
        return [f"apkernels._C did not load: {LOAD_ERROR}"]
    problems = []
    missing_cpu = sorted(set(_library.SCHEMAS) - NATIVE["CPU"])
    if missing_cpu:
        problems.append(f"apkernels._C has no CPU kernel for {', '.join(missing_cpu)}")
    if cuda_kernels_expected():
        missing_cuda = sorted(set(_library.SCHEMAS) - NATIVE["CUDA"])
        if missing_cuda:
            problems.append(
                f"apkernels._C has no CUDA kernel for {', '.join(missing_cuda)} although torch is a CUDA "
                "build and nvcc is on PATH (set APKERNELS_CUDA=0 when building to build CPU-only on purpose)"
            )
    return problems


def _warn_once() -> None:
    if os.environ.get("APKERNELS_QUIET") == "1":
        return
    if OTHER_TORCH is not None:
        # One line on stderr (a warning would add the source line that triggered it).
        print(
            f"apkernels: _C was built for torch {OTHER_TORCH} but torch {torch.__version__} is installed; "
            f"running on the PyTorch/Triton fallbacks; {REBUILD_HINT}",
            file=sys.stderr,
        )
    elif _C is None:
        warnings.warn(
            f"apkernels: the compiled extension apkernels._C could not be loaded ({LOAD_ERROR}); "
            "torch.ops.apkernels.* run on the PyTorch reference; build it with `pip install .` "
            "(or `pip install -e .`) in the apkernels source tree.",
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
