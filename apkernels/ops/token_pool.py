"""APViT attentive token pooling as `torch.ops.apkernels.token_pool` (+ `_triton`)."""
import torch

from .. import _checks
from ._register import call, register_op

OP = "token_pool"


def _fake(x, q, k, keep, scale, score):
    _checks.token_pool(x, q, k, keep, scale, score)
    B, _, C = x.shape
    return x.new_empty(B, keep + 1, C), x.new_empty(B, keep + 1, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.num_tokens = inputs[0].shape[1]


def _backward(ctx, pool_backward, grad_tokens, _grad_index):
    (index,) = ctx.saved_tensors
    grad_x, _ = pool_backward(grad_tokens, index, ctx.num_tokens, False)
    return grad_x, None, None, None, None, None


register_op(OP, fake=_fake, setup_context=_setup_context, backward=_backward)


def token_pool(x, q, k, keep, *, scale, score="sum", backend="auto"):
    """Attentive token pooling: keep the CLS token and the `keep` highest-scoring patch tokens.

    Args:
        x: tokens [B, N, C], CLS first.
        q, k: queries and keys [B, heads, N, head_dim]; may be strided views of a qkv tensor
            (only the CLS query q[:, :, 0] is read).
        keep: number of patch tokens kept, 1 <= keep <= N-1.
        scale: the attention scale (head_dim ** -0.5); score_j = reduce_h(q[:, h, 0] . k[:, h, j] * scale).
        score: reduction over heads: "sum" (APViT), "sum_abs" or "max". Ties go to the lower
            position; NaN ranks highest.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        (tokens [B, keep+1, C], index [B, keep+1] int64) with index[:, 0] == 0 and the rest ascending.
        Gradients flow to x only (the selection has no gradient).
    """
    _checks.token_pool(x, q, k, keep, scale, score)
    return call(OP, backend, x, x, q, k, keep, float(scale), score)
