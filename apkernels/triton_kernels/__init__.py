"""Triton backend: one file per op (kernels, launcher, registration as `apkernels::<op>_triton`).

The modules are the op registry's (`_library.MODULES`); each registers the kernels of its ops with
`_common.register`, which adds their names to `_backend.TRITON_OPS`. On a machine without a GPU the
kernels run under TRITON_INTERPRET=1 (set before importing apkernels).
"""
import importlib

from .. import _backend
from .._library import MODULES


def _load() -> None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # triton missing or broken: the backend is just unavailable
        _backend.TRITON_IMPORT_ERROR = f"triton cannot be imported: {exc}"
        return
    for name in MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


_load()
