import os

import torch

# Without a GPU the Triton kernels run in the interpreter; this must be set before they are defined.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("APKERNELS_QUIET", "1")

import apkernels  # noqa: E402,F401


def pytest_report_header(config):
    """triton < 3.8 interprets `range(n)` of a runtime scalar with int() on a 1-element array, a
    TypeError since NumPy 2.4: say so once instead of a TypeError in every Triton test."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return (
            f"WARNING: triton {triton.__version__}'s interpreter fails on numpy {numpy.__version__} "
            "(TypeError in int() of an array): install numpy<2.4 (requirements-torch2.11.txt)"
        )
    return None
