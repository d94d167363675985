"""DAN spatial attention + global average pool as `torch.ops.apkernels.dan_spatial_pool` (+ `_triton`)."""
import torch

from .. import _checks
from ._register import call, register_op

OP = "dan_spatial_pool"


def _fake(x, z):
    _checks.dan_spatial_pool(x, z)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C, H, W = x.shape
    return x.new_empty(B, z.shape[1], C), x.new_empty(B, z.shape[1], H * W, dtype=acc)


def _fake_backward(grad_g, x, z, s):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        z, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    # s (the attention maps) is an output so that the backward reads it instead of recomputing it
    # from z; it carries no gradient of its own.
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs, output[1])


def _backward(ctx, dan_spatial_pool_backward, grad_g, grad_s):
    x, z, s = ctx.saved_tensors
    grad_x, grad_z = dan_spatial_pool_backward(grad_g, x, z, s)
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
    g, _ = call(OP, backend, x, x, z)
    return g
