"""DAN spatial attention + global average pool as `torch.ops.apkernels.dan_spatial_pool` (+ `_triton`)."""
import torch

from .. import _checks
from ._register import call, register_op

OP = "dan_spatial_pool"


def _fake(x, z):
    _checks.dan_spatial_pool(x, z)
    return x.new_empty(x.shape[0], z.shape[1], x.shape[1])


def _fake_backward(grad_g, x, z):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        z, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dan_spatial_pool_backward, grad_g):
    x, z = ctx.saved_tensors
    grad_x, grad_z = dan_spatial_pool_backward(grad_g, x, z)
    return grad_x, grad_z


register_op(OP, fake=_fake, setup_context=_setup_context, backward=_backward, backward_fake=_fake_backward)


def dan_spatial_pool(x, z, *, backend="auto"):
    """DAN's spatial attention applied and average-pooled, without materialising x * s.

    Args:
        x: shared features [B, C, H, W].
        z: each head's pre-ReLU sum of its 3x3 + 1x3 + 3x1 conv branches [B, M, C2, H, W].
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        g [B, M, C]: g[b, m, c] = mean over positions p of x[b, c, p] * sum_c2 relu(z[b, m, c2, p]).
    """
    _checks.dan_spatial_pool(x, z)
    return call(OP, backend, x, x, z)
