"""The CUDA emulation build: the CUDA kernel sources (csrc/ops/cuda) compiled for the CPU.

``apkernels._C_emulated`` exists when the extension was built with ``APKERNELS_CUDA_EMULATION=1``
(``make test`` does). It registers every CUDA kernel as ``apkernels::<op>_cuda_emulated`` for CPU
tensors; ``backend="cuda"`` on CPU tensors runs them (``"auto"`` never does: they are slow and
exist to test the CUDA code). Each launch runs every CUDA thread as a fiber and checks every memory
access; errors (shared-memory races, out-of-bounds global accesses, barriers or warp collectives
that not every thread reaches) raise RuntimeError naming the kernel, block, thread and address.

Counters: ``counters()`` lists one dict per launch since ``reset_counters()`` (kernel, grid,
block, global bytes read/written in total and distinct).
"""
import importlib.util

from . import _library

SUFFIX = _library.EMULATED_SUFFIX  # its schemas, fake kernels and autograd come with the other suffixes
# Deliberately broken builds of the kernels (setup.py EMULATION_MUTANTS): `<op>_cuda_mutant_<name>`,
# schemas only (tests/test_cuda_emulation.py calls them directly).
MUTANT_SUFFIXES = ("_cuda_mutant_off_by_one", "_cuda_mutant_single_buffer")

_C_emulated = None
LOAD_ERROR = None
try:
    from . import _C_emulated  # noqa: F811  (registers the emulated kernels on import)
except ImportError as exc:
    LOAD_ERROR = exc if importlib.util.find_spec(f"{__package__}._C_emulated") else "it has not been built"

if _C_emulated is not None:
    for _suffix in MUTANT_SUFFIXES:
        for _name, _schema in _library.SCHEMAS.items():
            _library.LIB.define(_name + _suffix + _schema)

# Ops with an emulated CUDA kernel (checked once: torch.compile traces `available`).
OPS = frozenset(op for op in _library.SCHEMAS if _C_emulated is not None and _library.has_kernel(op + SUFFIX, "CPU"))


def available(op: str) -> bool:
    """True when the emulated CUDA kernel of `op` was built (it runs on CPU tensors)."""
    return op in OPS


def counters() -> list:
    """One dict per emulated launch since the last reset_counters()."""
    return _C_emulated.counters() if _C_emulated is not None else []


def reset_counters() -> None:
    if _C_emulated is not None:
        _C_emulated.reset_counters()


def status() -> str:
    """One line for `python -m apkernels`."""
    if _C_emulated is None:
        return f"not built ({LOAD_ERROR}); build with APKERNELS_CUDA_EMULATION=1"
    ops = sorted(op for op in _library.SCHEMAS if available(op))
    return f"built: {', '.join(ops)} (backend='cuda' on CPU tensors)"
