"""DAN spatial attention + global average pool (SPEC 2.2) as `torch.ops.apkernels.dan_spatial_pool`."""
import torch

from .. import _backend, _emulation, _extension, reference
from .._library import TRITON_SUFFIX, qualname, register_kernel
from . import _common

OP = "dan_spatial_pool"


def validate(x, z) -> None:
    _common.check_tensor(OP, "x", x, 4, "[B, C, H, W]")
    _common.check_nonempty(OP, "x", x, "B, C, H, W")
    _common.check_tensor(OP, "z", z, 5, "[B, heads, C2, H, W]")
    _common.check_nonempty(OP, "z", z, "B, heads, C2, H, W")
    B, _, H, W = x.shape
    if z.shape[0] != B or tuple(z.shape[3:]) != (H, W):
        raise ValueError(
            f"{OP}: z must have shape [{B}, heads, C2, {H}, {W}] (B, H, W of x), got {tuple(z.shape)}"
        )
    _common.check_like(OP, "z", z, "x", x)


def _fake(x, z):
    validate(x, z)
    return x.new_empty(x.shape[0], z.shape[1], x.shape[1])


def _fake_backward(grad_g, x, z):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        z, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(suffix):
    def backward(ctx, grad_g):
        x, z = ctx.saved_tensors
        grad_x, grad_z = getattr(torch.ops.apkernels, OP + "_backward" + suffix)(grad_g, x, z)
        return grad_x, grad_z

    return backward


def _reference_kernel(x, z):
    validate(x, z)
    return reference.dan_spatial_pool(x, z)


for _suffix in ("", TRITON_SUFFIX) + _emulation.OP_SUFFIXES:
    torch.library.register_fake(qualname(OP + _suffix))(_fake)
    torch.library.register_fake(qualname(OP + "_backward" + _suffix))(_fake_backward)
    torch.library.register_autograd(qualname(OP + _suffix), _make_backward(_suffix), setup_context=_setup_context)

for _key in ("CPU", "CUDA"):
    if OP not in _extension.NATIVE[_key]:
        register_kernel(OP, _reference_kernel, (_key,))
    if OP + "_backward" not in _extension.NATIVE[_key]:
        register_kernel(OP + "_backward", reference.dan_spatial_pool_backward, (_key,))


def dan_spatial_pool(x, z, *, backend="auto"):
    """DAN's spatial attention applied and average-pooled, without materialising x * s.

    Args:
        x: shared features [B, C, H, W].
        z: each head's pre-ReLU sum of its 3x3 + 1x3 + 3x1 conv branches [B, M, C2, H, W].
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        g [B, M, C]: g[b, m, c] = mean over positions p of x[b, c, p] * sum_c2 relu(z[b, m, c2, p]).
    """
    validate(x, z)
    chosen = _backend.resolve(OP, backend, x.device, x.dtype)
    if chosen == "reference":
        return reference.dan_spatial_pool(x, z)
    op = getattr(torch.ops.apkernels, OP + _backend.op_suffix(chosen, x.device))
    return op(x, z)
