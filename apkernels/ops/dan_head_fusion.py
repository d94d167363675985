"""DAN channel gating + attention fusion as `torch.ops.apkernels.dan_head_fusion` (+ `_triton`)."""
from .. import _checks
from ._register import call, register_op

OP = "dan_head_fusion"


def _fake(g, gate_logits):
    _checks.dan_head_fusion(g, gate_logits)
    return g.new_empty(g.shape[0], g.shape[2]), g.new_empty(g.shape)


def _fake_backward(grad_fused, grad_heads, g, gate_logits, heads):
    return g.new_empty(g.shape), g.new_empty(g.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _backward(ctx, dan_head_fusion_backward, grad_fused, grad_heads):
    g, gate_logits, heads = ctx.saved_tensors
    return dan_head_fusion_backward(grad_fused, grad_heads, g, gate_logits, heads)


register_op(OP, fake=_fake, setup_context=_setup_context, backward=_backward, backward_fake=_fake_backward)


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
    _checks.dan_head_fusion(g, gate_logits)
    return call(OP, backend, g, g, gate_logits)
