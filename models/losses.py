"""DAN's training losses (SPEC 2.1, 2.3): affinity (large-margin feature clustering) and partition."""
from __future__ import annotations

import sys

import torch
from torch import nn


class AffinityLoss(nn.Module):
    """Affinity loss of DAN's Feature Clustering Network.

    Learnable class centres c [num_classes, feat_dim] (randn init). For features [B, feat_dim, H, W]
    (global-average-pooled first) or [B, feat_dim] and labels [B]:
    loss = sum_b clamp(||x_b - c_{y_b}||^2 / sum_j var_i(c[i, j]), 1e-12, 1e12) / B,
    pulling each feature to its class centre relative to how spread the centres are.
    """

    def __init__(self, num_classes: int = 7, feat_dim: int = 512):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"AffinityLoss: num_classes must be >= 2 (the centre variance needs two), got {num_classes}")
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"AffinityLoss: features must be [B, {self.feat_dim}] or [B, {self.feat_dim}, H, W], "
                f"got {tuple(features.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"AffinityLoss: labels must be [B] = [{features.shape[0]}], got {tuple(labels.shape)}")
        centers = self.centers.to(features.dtype)
        distance = (features - centers[labels]).square().sum(1)
        spread = centers.var(dim=0).sum()
        return (distance / spread).clamp(min=1e-12, max=1e12).sum() / features.shape[0]


class PartitionLoss(nn.Module):
    """Partition loss of DAN's Attention Fusion Network: pushes the M heads apart.

    heads [B, M, C] -> log(1 + M / (mean over (b, c) of var over m + eps)), eps the machine epsilon
    of a Python float (``sys.float_info.epsilon``, as the official code); 0 for a single head.
    """

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        if heads.dim() != 3:
            raise ValueError(f"PartitionLoss: heads must be [B, heads, C], got {tuple(heads.shape)}")
        num_heads = heads.shape[1]
        if num_heads <= 1:
            return heads.new_zeros(())
        variance = heads.var(dim=1).mean()
        return torch.log(1 + num_heads / (variance + sys.float_info.epsilon))
