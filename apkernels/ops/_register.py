"""What every op registers besides its kernels, and how a public function runs on a backend.

`register_op` does, for an op of `_library.OP_TABLE` and its Triton twin `<op>_triton`: the fake
kernel (shapes for torch.compile / meta tensors), the autograd formula (its backward op of the same
backend), and, where `apkernels._C` has no CPU / CUDA kernel, the reference (`reference.<op>`) as
that kernel so `torch.ops.apkernels.<op>` always runs.
"""
import torch

from .. import _backend, _extension, _library, reference


def kernel(name: str, backend: str, device) -> object:
    """The op a concrete backend runs on `device`: `<name>_triton` for Triton, else the native op
    (the CPU / CUDA kernels of apkernels._C, or their reference fallbacks)."""
    return getattr(torch.ops.apkernels, name + _backend.op_suffix(backend, torch.device(device)))


def call(name: str, backend, like: torch.Tensor, *args):
    """Run op `name` on `backend` ("auto" resolved for `like`'s device and dtype); the arguments
    are already validated."""
    chosen = _backend.resolve(name, backend, like.device, like.dtype)
    if chosen == "reference":
        return getattr(reference, name)(*args)
    return kernel(name, chosen, like.device)(*args)


def _register_fallbacks(name: str) -> None:
    for key in ("CPU", "CUDA"):
        if name not in _extension.NATIVE[key]:
            _library.register_kernel(name, getattr(reference, name), (key,))


def register_op(name: str, *, fake, setup_context=None, backward=None, backward_fake=None) -> None:
    """Register op `name` (an entry of `_library.OP_TABLE`) and its Triton twin.

    fake: the fake kernel (validates the arguments: a compiled graph skips the public function).
    setup_context, backward: the autograd formula; backward(ctx, backward_op, *grads) gets the
        op's backward op (`OpDef.backward`) of the same backend.
    backward_fake: the fake kernel of the backward op when this module implements it too.
    """
    op_def = _library.OP_DEFS[name]
    for suffix in _library.OP_SUFFIXES:
        torch.library.register_fake(_library.qualname(name + suffix))(fake)
        if backward_fake is not None:
            torch.library.register_fake(_library.qualname(op_def.backward + suffix))(backward_fake)
        if backward is not None:
            backward_op = getattr(torch.ops.apkernels, op_def.backward + suffix)

            def autograd_backward(ctx, *grads, _op=backward_op):
                return backward(ctx, _op, *grads)

            torch.library.register_autograd(
                _library.qualname(name + suffix), autograd_backward, setup_context=setup_context
            )
    _register_fallbacks(name)
    if backward_fake is not None:
        _register_fallbacks(op_def.backward)
