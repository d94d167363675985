"""apkernels: fused attentive pooling (APViT) and multi-head cross attention (DAN) kernels.

Layers: `torch.ops.apkernels.*` (the op registry and schemas in `_library`, kernels in `_C` /
Triton / reference) -> validated functional ops (`apkernels.patch_pool`, ...) -> `apkernels.nn`
modules -> `models/`.
"""
from . import _library  # noqa: F401  (defines the op schemas first)
from . import _extension  # noqa: F401  (loads apkernels._C kernels)
from . import ops  # noqa: F401  (fake/autograd registrations and reference fallbacks)
from . import triton_kernels  # noqa: F401
from . import nn  # noqa: F401
from . import reference  # noqa: F401
from ._backend import BACKENDS, available_backends
from ._library import OPS
from ._version import __version__

globals().update({_name: getattr(ops, _name) for _name in OPS})

__all__ = [*OPS, "available_backends", "BACKENDS", "OPS"]
