"""APViT attentive patch pooling (SPEC 1.2) as `torch.ops.apkernels.patch_pool` (+ `_triton`)."""
import torch

from .. import _backend, _emulation, _extension, reference
from .._library import TRITON_SUFFIX, qualname, register_kernel
from . import _common
from .pool_backward import backward_op

OP = "patch_pool"


def validate(x, keep, pos, score) -> None:
    _common.check_tensor(OP, "x", x, 4, "[B, C, H, W]")
    _common.check_nonempty(OP, "x", x, "B, C, H, W")
    B, C, H, W = x.shape
    N = H * W
    _common.check_keep(OP, keep, 1, N, "1 to the number of positions H*W")
    if pos is not None:
        _common.check_tensor(OP, "pos", pos, pos.dim() if isinstance(pos, torch.Tensor) else 2, "[H*W, C]")
        if tuple(pos.shape) not in ((N, C), (1, N, C)):
            raise ValueError(f"{OP}: pos must have shape [{N}, {C}] or [1, {N}, {C}] (H*W, C), got {tuple(pos.shape)}")
        _common.check_like(OP, "pos", pos, "x", x)
    _common.check_choice(OP, "score", score, reference.PATCH_SCORES)


def _fake(x, keep, pos, score):
    validate(x, keep, pos, score)
    B, C, _, _ = x.shape
    return x.new_empty(B, keep, C), x.new_empty(B, keep, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    x, _, pos, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.x_shape = tuple(x.shape)
    ctx.pos_shape = None if pos is None else tuple(pos.shape)


def _make_backward(suffix):
    def backward(ctx, grad_tokens, _grad_index):
        (index,) = ctx.saved_tensors
        B, C, H, W = ctx.x_shape
        need_pos = ctx.pos_shape is not None and ctx.needs_input_grad[2]
        grad_rows, grad_pos = backward_op(suffix)(grad_tokens, index, H * W, need_pos)
        # [B, H*W, C] rows viewed as [B, C, H, W] (channels_last strides): no copy.
        grad_x = grad_rows.transpose(1, 2).unflatten(2, (H, W)) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_pos.reshape(ctx.pos_shape) if need_pos else None, None

    return backward


def _reference_kernel(x, keep, pos, score):
    validate(x, keep, pos, score)
    return reference.patch_pool(x, keep, pos, score)


for _suffix in ("", TRITON_SUFFIX) + _emulation.OP_SUFFIXES:
    torch.library.register_fake(qualname(OP + _suffix))(_fake)
    torch.library.register_autograd(qualname(OP + _suffix), _make_backward(_suffix), setup_context=_setup_context)

for _key in ("CPU", "CUDA"):
    if OP not in _extension.NATIVE[_key]:
        register_kernel(OP, _reference_kernel, (_key,))


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
    validate(x, keep, pos, score)
    chosen = _backend.resolve(OP, backend, x.device, x.dtype)
    if chosen == "reference":
        return reference.patch_pool(x, keep, pos, score)
    op = getattr(torch.ops.apkernels, OP + _backend.op_suffix(chosen, x.device))
    return op(x, keep, pos, score)
