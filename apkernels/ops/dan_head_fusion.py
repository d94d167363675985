"""DAN channel gating + attention fusion (SPEC 2.2-2.3) as `torch.ops.apkernels.dan_head_fusion`."""
import torch

from .. import _backend, _emulation, _extension, reference
from .._library import TRITON_SUFFIX, qualname, register_kernel
from . import _common

OP = "dan_head_fusion"


def validate(g, gate_logits) -> None:
    _common.check_tensor(OP, "g", g, 3, "[B, heads, C]")
    _common.check_nonempty(OP, "g", g, "B, heads, C")
    _common.check_tensor(OP, "gate_logits", gate_logits, 3, "[B, heads, C]")
    if tuple(gate_logits.shape) != tuple(g.shape):
        raise ValueError(
            f"{OP}: gate_logits must have the shape of g {tuple(g.shape)}, got {tuple(gate_logits.shape)}"
        )
    _common.check_like(OP, "gate_logits", gate_logits, "g", g)


def _fake(g, gate_logits):
    validate(g, gate_logits)
    return g.new_empty(g.shape[0], g.shape[2]), g.new_empty(g.shape)


def _fake_backward(grad_fused, grad_heads, g, gate_logits, heads):
    return g.new_empty(g.shape), g.new_empty(g.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _make_backward(suffix):
    def backward(ctx, grad_fused, grad_heads):
        g, gate_logits, heads = ctx.saved_tensors
        return getattr(torch.ops.apkernels, OP + "_backward" + suffix)(grad_fused, grad_heads, g, gate_logits, heads)

    return backward


def _reference_kernel(g, gate_logits):
    validate(g, gate_logits)
    return reference.dan_head_fusion(g, gate_logits)


for _suffix in ("", TRITON_SUFFIX) + _emulation.OP_SUFFIXES:
    torch.library.register_fake(qualname(OP + _suffix))(_fake)
    torch.library.register_fake(qualname(OP + "_backward" + _suffix))(_fake_backward)
    torch.library.register_autograd(qualname(OP + _suffix), _make_backward(_suffix), setup_context=_setup_context)

for _key in ("CPU", "CUDA"):
    if OP not in _extension.NATIVE[_key]:
        register_kernel(OP, _reference_kernel, (_key,))
    if OP + "_backward" not in _extension.NATIVE[_key]:
        register_kernel(OP + "_backward", reference.dan_head_fusion_backward, (_key,))


def dan_head_fusion(g, gate_logits, *, backend="auto"):
    """DAN's channel attention gate and attention fusion across heads, fused.

    Args:
        g: pooled spatial-attention features per head [B, M, C].
        gate_logits: the channel-attention MLP outputs before the sigmoid [B, M, C].
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        (fused [B, C], heads [B, M, C]): heads = g * sigmoid(gate_logits), log-softmaxed over the
        heads when M > 1 (as the official code returns them); fused = heads.sum(1).
    """
    validate(g, gate_logits)
    chosen = _backend.resolve(OP, backend, g.device, g.dtype)
    if chosen == "reference":
        return reference.dan_head_fusion(g, gate_logits)
    op = getattr(torch.ops.apkernels, OP + _backend.op_suffix(chosen, g.device))
    return op(g, gate_logits)
