"""`pool_backward`: the backward op shared by patch_pool and token_pool (a row scatter)."""
import torch

from .. import _emulation, _extension, reference
from .._library import TRITON_SUFFIX, qualname, register_kernel

OP = "pool_backward"


def _fake(grad_tokens, index, num_rows, reduce_batch):
    B, _, C = grad_tokens.shape
    grad_sum = grad_tokens.new_empty(num_rows, C) if reduce_batch else grad_tokens.new_empty(0)
    return grad_tokens.new_empty(B, num_rows, C), grad_sum


for _suffix in ("", TRITON_SUFFIX) + _emulation.OP_SUFFIXES:
    torch.library.register_fake(qualname(OP + _suffix))(_fake)

for _key in ("CPU", "CUDA"):
    if OP not in _extension.NATIVE[_key]:
        register_kernel(OP, reference.pool_backward, (_key,))


def backward_op(backend: str):
    """The pool_backward op matching a forward op's backend suffix ("" or "_triton")."""
    return getattr(torch.ops.apkernels, OP + backend)
