"""APViT attentive patch pooling as `torch.ops.apkernels.patch_pool` (+ `_triton`)."""
import torch

from .. import _checks
from ._register import call, register_op

OP = "patch_pool"


def _fake(x, keep, pos, score):
    _checks.patch_pool(x, keep, pos, score)
    B, C, _, _ = x.shape
    return x.new_empty(B, keep, C), x.new_empty(B, keep, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    x, _, pos, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.x_shape = tuple(x.shape)
    ctx.pos_shape = None if pos is None else tuple(pos.shape)


def _backward(ctx, pool_backward, grad_tokens, _grad_index):
    (index,) = ctx.saved_tensors
    B, C, H, W = ctx.x_shape
    need_pos = ctx.pos_shape is not None and ctx.needs_input_grad[2]
    grad_rows, grad_pos = pool_backward(grad_tokens, index, H * W, need_pos)
    # [B, H*W, C] rows viewed as [B, C, H, W] (channels_last strides): no copy.
    grad_x = grad_rows.transpose(1, 2).unflatten(2, (H, W)) if ctx.needs_input_grad[0] else None
    return grad_x, None, grad_pos.reshape(ctx.pos_shape) if need_pos else None, None


register_op(OP, fake=_fake, setup_context=_setup_context, backward=_backward)


def patch_pool(x, keep, pos=None, *, score="sum_abs", backend="auto"):
    """Attentive patch pooling: keep the `keep` highest-scoring positions of a feature map.

    Args:
        x: feature map [B, C, H, W] (any strides, channels_last included).
        keep: number of positions kept, 1 <= keep <= H*W.
        pos: optional position embedding [H*W, C] or [1, H*W, C], added to the kept tokens.
        score: channel reduction giving each position's score: "sum_abs" (APViT), "sum", "sum_sq",
            "max" or "max_abs". Ties go to the lower position; NaN ranks highest.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        (tokens [B, keep, C], index [B, keep] int64): (x as tokens + pos) at the kept positions,
        ordered by ascending position. Gradients flow to x and pos through the gathered values.
    """
    _checks.patch_pool(x, keep, pos, score)
    return call(OP, backend, x, x, keep, pos, score)
