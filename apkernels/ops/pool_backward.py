"""`pool_backward`: the backward op shared by patch_pool and token_pool (a row scatter-add)."""
from .. import _checks
from ._register import register_op

OP = "pool_backward"


def _fake(grad_tokens, index, num_rows, reduce_batch):
    _checks.pool_backward(grad_tokens, index, num_rows)
    B, _, C = grad_tokens.shape
    grad_sum = grad_tokens.new_empty(num_rows, C) if reduce_batch else grad_tokens.new_empty(0)
    return grad_tokens.new_empty(B, num_rows, C), grad_sum


register_op(OP, fake=_fake)
