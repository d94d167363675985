"""DAN's losses (models/losses.py) vs hand-written formulas and the official code."""
import math
import sys

import pytest
import torch

from models import AffinityLoss, PartitionLoss


def affinity_by_hand(x, labels, centers):
    """The official affinity loss, element by element: sum_b clamp(||x_b - c_{y_b}||^2 / sum_j var_i c[i, j]) / B."""
    num_classes, dim = centers.shape
    spread = 0.0
    for j in range(dim):
        column = [centers[i, j].item() for i in range(num_classes)]
        mean = sum(column) / num_classes
        spread += sum((v - mean) ** 2 for v in column) / (num_classes - 1)
    total = 0.0
    for b in range(x.shape[0]):
        d = sum((x[b, j].item() - centers[labels[b], j].item()) ** 2 for j in range(dim))
        total += min(max(d / spread, 1e-12), 1e12)
    return total / x.shape[0]


def affinity_official(x, labels, centers):
    """yaoing/DAN AffinityLoss.forward (after its GAP): the expanded distance matrix, masked."""
    batch_size, num_class = x.size(0), centers.size(0)
    distmat = torch.pow(x, 2).sum(dim=1, keepdim=True).expand(batch_size, num_class) + \
        torch.pow(centers, 2).sum(dim=1, keepdim=True).expand(num_class, batch_size).t()
    distmat = distmat.addmm(x, centers.t(), beta=1, alpha=-2)
    classes = torch.arange(num_class).long()
    mask = labels.unsqueeze(1).expand(batch_size, num_class).eq(classes.expand(batch_size, num_class))
    dist = distmat * mask.float() / centers.var(dim=0).sum()
    return dist.clamp(min=1e-12, max=1e12).sum() / batch_size


def test_affinity_matches_hand_formula_and_official_code():
    torch.manual_seed(0)
    loss = AffinityLoss(num_classes=5, feat_dim=6).double()
    features = torch.randn(4, 6, 3, 2, dtype=torch.float64)
    labels = torch.tensor([0, 4, 4, 2])
    got = loss(features, labels)
    pooled = features.mean((2, 3))
    # Like the official code, the loss clamps the B * (K - 1) masked zeros up to 1e-12 each.
    by_hand = affinity_by_hand(pooled, labels, loss.centers.detach())
    assert got.item() == pytest.approx(by_hand + 4 * 4 * 1e-12 / 4, rel=1e-12)
    assert got.item() != pytest.approx(by_hand, rel=1e-12)
    # Operation for operation the official computation: equal to the last bit.
    official = affinity_official(torch.nn.functional.adaptive_avg_pool2d(features, 1).flatten(1), labels,
                                 loss.centers.detach())
    assert torch.equal(got.detach(), official)
    assert loss(pooled, labels).item() == pytest.approx(got.item(), rel=1e-14)  # [B, C] input too


def test_affinity_spare_centres_enter_the_spread_only():
    """DAN's official RAF-DB run: 8 centres for 7 classes; the 8th has no samples but widens the
    spread term, so it gets a gradient."""
    torch.manual_seed(3)
    loss = AffinityLoss(num_classes=8, feat_dim=6).double()
    x, labels = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 6, 3, 3, 1])
    value = loss(x, labels)
    assert value.item() == pytest.approx(affinity_by_hand(x, labels, loss.centers.detach()) + 7e-12, rel=1e-12)
    value.backward()
    assert loss.centers.grad[7].abs().sum() > 0


def test_affinity_clamps_and_gradients():
    torch.manual_seed(1)
    loss = AffinityLoss(num_classes=3, feat_dim=4).double()
    labels = torch.tensor([2, 0])
    at_centres = loss.centers.detach()[labels].clone()
    assert loss(at_centres, labels).item() == pytest.approx(3e-12, abs=1e-14)  # every d = 0 is clamped up
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: AffinityLoss.forward(_with_centers(loss, c), x, labels),
                                    (x, loss.centers.detach().clone().requires_grad_()))
    assert loss.centers.shape == (3, 4) and loss.centers.requires_grad


def _with_centers(loss, centers):
    clone = AffinityLoss(loss.num_classes, loss.feat_dim)
    del clone.centers
    clone.centers = centers
    return clone


def test_affinity_bad_arguments():
    loss = AffinityLoss(7, 512)
    with pytest.raises(ValueError, match=r"features must be \[B, 512\]"):
        loss(torch.randn(2, 256), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be \[B\] = \[2\]"):
        loss(torch.randn(2, 512), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        AffinityLoss(1, 8)


def partition_by_hand(heads):
    B, M, C = heads.shape
    variances = []
    for b in range(B):
        for c in range(C):
            values = [heads[b, m, c].item() for m in range(M)]
            mean = sum(values) / M
            variances.append(sum((v - mean) ** 2 for v in values) / (M - 1))
    return math.log(1 + M / (sum(variances) / len(variances) + sys.float_info.epsilon))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 2, 7), (2, 3, 1)])
def test_partition_matches_hand_formula(shape):
    torch.manual_seed(2)
    heads = torch.randn(shape, dtype=torch.float64)
    assert PartitionLoss()(heads).item() == pytest.approx(partition_by_hand(heads), rel=1e-12)
    heads.requires_grad_()
    assert torch.autograd.gradcheck(PartitionLoss(), (heads,))


def test_partition_edge_cases():
    assert PartitionLoss()(torch.randn(3, 1, 8)).item() == 0.0  # one head: no partition loss
    equal_heads = torch.ones(2, 4, 3)  # zero variance: eps keeps it finite
    assert PartitionLoss()(equal_heads).item() == pytest.approx(math.log(1 + 4 / sys.float_info.epsilon), rel=1e-6)
    spread = torch.randn(8, 4, 16)
    assert PartitionLoss()(spread * 10) < PartitionLoss()(spread)  # more spread heads, smaller loss
    with pytest.raises(ValueError, match=r"heads must be \[B, heads, C\]"):
        PartitionLoss()(torch.randn(4, 512))
