"""APViT attentive token pooling (SPEC 1.3) as `torch.ops.apkernels.token_pool` (+ `_triton`)."""
import torch

from .. import _backend, _emulation, _extension, reference
from .._library import TRITON_SUFFIX, qualname, register_kernel
from . import _common
from .pool_backward import backward_op

OP = "token_pool"


def validate(x, q, k, keep, scale, score) -> None:
    _common.check_tensor(OP, "x", x, 3, "[B, N, C]")
    _common.check_nonempty(OP, "x", x, "B, N, C")
    B, N, C = x.shape
    if N < 2:
        raise ValueError(f"{OP}: x must hold the CLS token and at least one patch token (N >= 2), got N={N}")
    _common.check_tensor(OP, "q", q, 4, "[B, heads, N, head_dim]")
    _common.check_tensor(OP, "k", k, 4, "[B, heads, N, head_dim]")
    if k.shape[0] != B or k.shape[2] != N or k.shape[1] < 1 or k.shape[3] < 1:
        raise ValueError(f"{OP}: k must have shape [{B}, heads, {N}, head_dim] (B, N of x), got {tuple(k.shape)}")
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"{OP}: q must have the same shape as k {tuple(k.shape)}, got {tuple(q.shape)}")
    _common.check_like(OP, "q", q, "x", x, dtype=False)
    _common.check_like(OP, "k", k, "q", q)
    _common.check_keep(OP, keep, 1, N - 1, "1 to the number of patch tokens N-1")
    _common.check_scale(OP, scale)
    _common.check_choice(OP, "score", score, reference.TOKEN_SCORES)


def _fake(x, q, k, keep, scale, score):
    validate(x, q, k, keep, scale, score)
    B, _, C = x.shape
    return x.new_empty(B, keep + 1, C), x.new_empty(B, keep + 1, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.num_tokens = inputs[0].shape[1]


def _make_backward(suffix):
    def backward(ctx, grad_tokens, _grad_index):
        (index,) = ctx.saved_tensors
        grad_x, _ = backward_op(suffix)(grad_tokens, index, ctx.num_tokens, False)
        return grad_x, None, None, None, None, None

    return backward


def _reference_kernel(x, q, k, keep, scale, score):
    validate(x, q, k, keep, scale, score)
    return reference.token_pool(x, q, k, keep, scale, score)


for _suffix in ("", TRITON_SUFFIX) + _emulation.OP_SUFFIXES:
    torch.library.register_fake(qualname(OP + _suffix))(_fake)
    torch.library.register_autograd(qualname(OP + _suffix), _make_backward(_suffix), setup_context=_setup_context)

for _key in ("CPU", "CUDA"):
    if OP not in _extension.NATIVE[_key]:
        register_kernel(OP, _reference_kernel, (_key,))


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
    validate(x, q, k, keep, scale, score)
    chosen = _backend.resolve(OP, backend, x.device, x.dtype)
    scale = float(scale)
    if chosen == "reference":
        return reference.token_pool(x, q, k, keep, scale, score)
    op = getattr(torch.ops.apkernels, OP + _backend.op_suffix(chosen, x.device))
    return op(x, q, k, keep, scale, score)
