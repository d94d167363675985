"""Attentive pooling modules (APViT): thin wrappers holding the keep / score settings."""
import torch
from torch import nn

from ..ops import patch_pool, token_pool
from ..reference import PATCH_SCORES, TOKEN_SCORES


class AttentivePatchPool(nn.Module):
    """Attentive Patch Pooling: keep the `keep` highest-scoring positions of a CNN feature map.

    forward(x [B, C, H, W], pos=None) -> (tokens [B, keep, C], index [B, keep]); with
    keep=None (or keep == H*W) every position is kept, in order.
    """

    def __init__(self, keep: int | None, score: str = "sum_abs", backend: str = "auto"):
        super().__init__()
        if score not in PATCH_SCORES:
            raise ValueError(f"AttentivePatchPool: score must be one of {PATCH_SCORES}, got {score!r}")
        self.keep, self.score, self.backend = keep, score, backend

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None):
        keep = x.shape[2] * x.shape[3] if self.keep is None else self.keep
        return patch_pool(x, keep, pos, score=self.score, backend=self.backend)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, score={self.score!r}, backend={self.backend!r}"


class AttentiveTokenPool(nn.Module):
    """Attentive Token Pooling: keep CLS and the top `keep_rate` of the patch tokens, scored by the
    CLS row of the pre-softmax attention logits (APViT: keep = max(int((N-1) * rate), 1)).

    forward(x [B, N, C], q, k [B, heads, N, head_dim], scale) -> (tokens, index); when nothing
    would be dropped, returns (x, None) unchanged, as the official code does.
    """

    def __init__(self, keep_rate: float, score: str = "sum", backend: str = "auto"):
        super().__init__()
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"AttentiveTokenPool: keep_rate must be in (0, 1], got {keep_rate}")
        if score not in TOKEN_SCORES:
            raise ValueError(f"AttentiveTokenPool: score must be one of {TOKEN_SCORES}, got {score!r}")
        self.keep_rate, self.score, self.backend = keep_rate, score, backend

    def num_kept(self, num_patch_tokens: int) -> int:
        return max(int(num_patch_tokens * self.keep_rate), 1)

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float):
        n = x.shape[1] - 1
        keep = self.num_kept(n)
        if self.keep_rate >= 1.0 or keep >= n:
            return x, None
        return token_pool(x, q, k, keep, scale=scale, score=self.score, backend=self.backend)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, score={self.score!r}, backend={self.backend!r}"
