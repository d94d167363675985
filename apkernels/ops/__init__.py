"""Functional ops (layer 1): validated entry points over `torch.ops.apkernels.*`, one module per
`_library.MODULES` entry; the public functions are `_library.OPS`."""
import importlib

from .._library import MODULES, OPS

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
# Each public op's function shadows its module's name in this package (apkernels.ops.patch_pool).
globals().update({_name: getattr(importlib.import_module(f"{__name__}.{_name}"), _name) for _name in OPS})

__all__ = list(OPS)
