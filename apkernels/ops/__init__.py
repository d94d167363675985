"""Functional ops (layer 1): validated entry points over `torch.ops.apkernels.*`."""
from .dan_head_fusion import dan_head_fusion
from .dan_spatial_pool import dan_spatial_pool
from .patch_pool import patch_pool
from .token_pool import token_pool

__all__ = ["patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion"]
