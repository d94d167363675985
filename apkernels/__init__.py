"""apkernels: fused attentive pooling (APViT) and multi-head cross attention (DAN) kernels.

Layers: `torch.ops.apkernels.*` (schemas in `_library`, kernels in `_C` / Triton / reference)
-> validated functional ops (`apkernels.patch_pool`, ...) -> `apkernels.nn` modules -> `models/`.
"""
from . import _library  # noqa: F401  (defines the op schemas first)
from . import _extension  # noqa: F401  (loads apkernels._C kernels)
from . import ops  # noqa: F401  (fake/autograd registrations and reference fallbacks)
from . import triton_kernels  # noqa: F401
from . import nn  # noqa: F401
from . import reference  # noqa: F401
from ._backend import BACKENDS, available_backends
from .ops import dan_head_fusion, dan_spatial_pool, patch_pool, token_pool

__version__ = "0.1.0"
OPS = ("patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion")

__all__ = [
    "patch_pool",
    "token_pool",
    "dan_spatial_pool",
    "dan_head_fusion",
    "available_backends",
    "BACKENDS",
    "OPS",
]
