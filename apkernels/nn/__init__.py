"""nn modules (layer 2) over the functional ops."""
from .pooling import AttentivePatchPool, AttentiveTokenPool

__all__ = ["AttentivePatchPool", "AttentiveTokenPool"]
