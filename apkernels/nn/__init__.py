"""nn modules (layer 2) over the functional ops."""
from .dan import MultiHeadCrossAttention
from .pooling import AttentivePatchPool, AttentiveTokenPool

__all__ = ["AttentivePatchPool", "AttentiveTokenPool", "MultiHeadCrossAttention"]
