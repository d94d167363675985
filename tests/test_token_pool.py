"""token_pool on every fast backend vs the reference: kept indices exactly, values, gradients."""
import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels import reference
from tests.pool_cases import (
    TOKEN_CASES,
    TokenCase,
    assert_close,
    assert_same_selection,
    assert_valid_index,
    backend_dtype_params,
    case_params,
    op_for,
    scores_to_check,
    skip_big,
    token_inputs,
)
from tests.utils import backend_params, dtypes_for, interpreted, small_ints

BACKENDS = backend_params("token_pool")
BACKEND_DTYPES = backend_dtype_params("token_pool")
EXACT_SCALE = 0.125  # a power of two keeps the integer logits exact, so ties must break identically


def _check(x, q, k, keep, scale, score, backend, dtype):
    tokens, index = apkernels.token_pool(x, q, k, keep, scale=scale, score=score, backend=backend)
    ref_tokens, ref_index = reference.token_pool(x, q, k, keep, scale, score)
    assert torch.equal(index, ref_index), score
    assert index.shape == (x.shape[0], keep + 1) and bool((index[:, 0] == 0).all())
    assert tokens.dtype == x.dtype
    assert_close(tokens, ref_tokens, dtype)


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", case_params(TOKEN_CASES))
def test_forward_matches_reference_every_score(device, backend, dtype, case):
    skip_big(case, device, backend)
    x, q, k = token_inputs(case, dtype, device)
    for score in scores_to_check(reference.TOKEN_SCORES, dtype, device, backend):
        _check(x, q, k, case.keep, EXACT_SCALE, score, backend, dtype)


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
def test_forward_random_floats_paper_scale(device, backend, dtype):
    """Random data and the real attention scale 96**-0.5 (scores not exact in every order)."""
    case = TOKEN_CASES[0] if not interpreted(device, backend) else TokenCase("small", 2, 19, 12, 3, 8, 13)
    x, q, k = token_inputs(case, dtype, device, seed=1, ints=False)
    scale = case.D**-0.5
    tokens, index = apkernels.token_pool(x, q, k, case.keep, scale=scale, backend=backend)
    _, ref_index = reference.token_pool(x, q, k, case.keep, scale)
    assert_valid_index(index[:, 1:], case.keep, 1, case.N)
    assert bool((index[:, 0] == 0).all())
    scores = reference.token_scores(q, k, scale, "sum").cpu()
    assert_same_selection(index[:, 1:].cpu() - 1, ref_index[:, 1:].cpu() - 1, scores, dtype)
    assert torch.equal(tokens, reference.gather_rows(x, index))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_dtypes_and_strided_x(device, backend):
    """q/k may have another dtype than x; x may be non-contiguous (here channel stride != 1)."""
    case = TOKEN_CASES[-2]
    x, q, k = token_inputs(case, torch.float32, device, qk_dtype=torch.bfloat16)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    for score in reference.TOKEN_SCORES:
        _check(xt, q, k, case.keep, EXACT_SCALE, score, backend, torch.float32)


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
def test_nan_inf_scores(device, backend, dtype):
    B, N, C, heads, D, keep = 2, 9, 5, 2, 3, 4
    g = torch.Generator().manual_seed(2)
    x = small_ints(B, N, C, dtype=dtype, device=device, generator=g)
    q = small_ints(B, heads, N, D, dtype=dtype, device=device, generator=g)
    k = small_ints(B, heads, N, D, dtype=dtype, device=device, generator=g)
    q[0, :, 0, :] = 1.0
    k[0, 0, 3, 0] = float("nan")
    k[0, 1, 5, 1] = float("inf")
    k[0, 0, 6, 2] = float("-inf")
    k[1, 1, 2, :] = float("nan")
    k[1, 0, 7, 0] = float("inf")
    q[1, 1, 0, 0] = 1.0
    for score in scores_to_check(reference.TOKEN_SCORES, dtype, device, backend):
        _check(x, q, k, keep, EXACT_SCALE, score, backend, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ties_go_to_the_lower_position(device, backend):
    x = torch.randn(1, 8, 4, device=device)
    q = torch.zeros(1, 2, 8, 3, device=device)
    _, index = apkernels.token_pool(x, q, q, 3, scale=0.5, backend=backend)
    assert index.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", case_params([c for c in TOKEN_CASES if c.name in ("paper", "b1_keep1", "keep_all", "odd_sizes")]))
def test_backward_matches_reference(device, backend, dtype, case):
    skip_big(case, device, backend)
    x, q, k = token_inputs(case, dtype, device, seed=3)
    grad = small_ints(case.B, case.keep + 1, case.C, dtype=dtype, device=device, generator=torch.Generator().manual_seed(4))
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    tokens, _ = apkernels.token_pool(xa, q, k, case.keep, scale=EXACT_SCALE, backend=backend)
    ref_tokens, _ = reference.token_pool(xr, q, k, case.keep, EXACT_SCALE)
    (got,) = torch.autograd.grad(tokens, xa, grad)
    (want,) = torch.autograd.grad(ref_tokens, xr, grad)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_fp64(device, backend):
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"the {backend} backend has no fp64 kernels")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 4, dtype=torch.float64, generator=g).to(device).requires_grad_()
    qkv = torch.randn(2, 7, 3, 2, 3, dtype=torch.float64, generator=g).to(device).permute(2, 0, 3, 1, 4)
    assert torch.autograd.gradcheck(
        lambda a: apkernels.token_pool(a, qkv[0], qkv[1], 4, scale=3**-0.5, backend=backend)[0], (x,)
    )


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 5, generator=g).to(device).requires_grad_()
    qkv = torch.randn(2, 7, 3, 2, 4, generator=g).to(device).permute(2, 0, 3, 1, 4)
    opcheck(op_for("token_pool", backend, device).default, (x, qkv[0], qkv[1], 3, 0.5, "sum"))
    opcheck(op_for("token_pool", backend, device).default, (x, qkv[0].contiguous(), qkv[1].contiguous(), 6, 0.5, "max"))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 6, generator=g).to(device).requires_grad_()
    qkv = torch.randn(2, 9, 3, 2, 4, generator=g).to(device).permute(2, 0, 3, 1, 4)

    def f(x, q, k):
        tokens, index = apkernels.token_pool(x, q, k, 5, scale=0.5, score="sum_abs", backend=backend)
        return (tokens * tokens).sum(), index

    torch._dynamo.reset()
    loss, index = torch.compile(f, fullgraph=True)(x, qkv[0], qkv[1])
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_index = f(x, qkv[0], qkv[1])
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_arguments_name_the_argument(device, backend):
    """Called directly (no Python validation in front), the kernel itself rejects bad arguments."""
    op = op_for("token_pool", backend, device)
    x, q = torch.randn(2, 5, 8, device=device), torch.randn(2, 2, 5, 4, device=device)
    cases = [
        ((x[0], q, q, 2, 0.5, "sum"), "x must be 3-D"),
        ((x.long(), q, q, 2, 0.5, "sum"), "x must be a floating-point"),
        ((x[:, :1], q[:, :, :1], q[:, :, :1], 1, 0.5, "sum"), "N >= 2"),
        ((x, q, torch.randn(2, 2, 6, 4, device=device), 2, 0.5, "sum"), "k must have shape"),
        ((x, torch.randn(2, 3, 5, 4, device=device), q, 2, 0.5, "sum"), "q must have the same shape"),
        ((x, q, q.double(), 2, 0.5, "sum"), "k must have the same dtype"),
        ((x, q, q, 0, 0.5, "sum"), r"keep must be in \[1, 4\]"),
        ((x, q, q, 5, 0.5, "sum"), r"keep must be in \[1, 4\]"),
        ((x, q, q, 2, float("inf"), "sum"), "scale must be a finite float"),
        ((x, q, q, 2, 0.5, "sum_sq"), "score must be one of"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)
