"""Triton backend: one file per op (kernels, launcher, registration as `apkernels::<op>_triton`).

Each module registers its kernels with `_library.register_kernel` and adds its op names to
`_backend.TRITON_OPS`. On a machine without a GPU the kernels run under TRITON_INTERPRET=1
(set before importing apkernels).
"""
import importlib

from .. import _backend

MODULES = ("pool_backward", "patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion")


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
