"""DAN's training losses: affinity (large-margin feature clustering) and partition."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


class AffinityLoss(nn.Module):
    """Affinity loss of DAN's Feature Clustering Network.

    Learnable centres c [num_classes, feat_dim] (randn init; `num_classes` may exceed the number of
    classes: DAN's official RAF-DB run has 8 centres for 7 classes, the spare one only enters the
    spread term). For features [B, feat_dim, H, W] (global-average-pooled first) or [B, feat_dim]
    and labels [B]: loss = sum_b clamp(||x_b - c_{y_b}||^2 / sum_j var_i(c[i, j]), 1e-12, 1e12) / B,
    pulling each feature to its class centre relative to how spread the centres are.

    Computed as the official code computes it, operation for operation, so that a training run
    follows the official one to the last bit: the squared distances to every centre expanded as
    |x|^2 + |c|^2 - 2 x.c, masked to the label's centre, and every entry of the masked [B, K] matrix
    clamped, so the K - 1 masked-out zeros of each row add (K - 1) * 1e-12 to the loss (nothing to
    its gradient).
    """

    def __init__(self, num_classes: int = 7, feat_dim: int = 512):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"AffinityLoss: num_classes must be >= 2 (the centre variance needs two), got {num_classes}")
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            features = F.adaptive_avg_pool2d(features, 1).flatten(1)
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"AffinityLoss: features must be [B, {self.feat_dim}] or [B, {self.feat_dim}, H, W], "
                f"got {tuple(features.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"AffinityLoss: labels must be [B] = [{features.shape[0]}], got {tuple(labels.shape)}")
        centers = self.centers.to(features.dtype)
        batch, num_centres = features.shape[0], centers.shape[0]
        distmat = torch.pow(features, 2).sum(dim=1, keepdim=True).expand(batch, num_centres) + \
            torch.pow(centers, 2).sum(dim=1, keepdim=True).expand(num_centres, batch).t()
        distmat = distmat.addmm(features, centers.t(), beta=1, alpha=-2)
        centre_ids = torch.arange(num_centres, device=labels.device)
        mask = labels.unsqueeze(1).expand(batch, num_centres).eq(centre_ids.expand(batch, num_centres))
        dist = distmat * mask.to(distmat.dtype)
        dist = dist / centers.var(dim=0).sum()
        return dist.clamp(min=1e-12, max=1e12).sum() / batch


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
