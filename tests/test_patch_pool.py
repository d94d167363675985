"""patch_pool on every fast backend vs the reference: kept indices exactly, values, gradients."""
import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels import reference
from tests.pool_cases import (
    PATCH_CASES,
    PatchCase,
    assert_close,
    assert_same_selection,
    assert_valid_index,
    backend_dtype_params,
    case_params,
    op_for,
    patch_inputs,
    scores_to_check,
    skip_big,
)
from tests.utils import backend_params, dtypes_for, interpreted, small_ints

BACKENDS = backend_params("patch_pool")
BACKEND_DTYPES = backend_dtype_params("patch_pool")


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", case_params(PATCH_CASES))
def test_forward_matches_reference_every_score(device, backend, dtype, case):
    """Exact integer inputs (ties everywhere): the kept indices must equal the reference's."""
    skip_big(case, device, backend)
    x, pos = patch_inputs(case, dtype, device)
    for score in scores_to_check(reference.PATCH_SCORES, dtype, device, backend):
        tokens, index = apkernels.patch_pool(x, case.keep, pos, score=score, backend=backend)
        ref_tokens, ref_index = reference.patch_pool(x, case.keep, pos, score)
        assert torch.equal(index, ref_index), score
        assert tokens.dtype == dtype and tokens.shape == (case.B, case.keep, case.C)
        assert_close(tokens, ref_tokens, dtype)


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
def test_forward_random_floats_paper_shape(device, backend, dtype):
    case = PATCH_CASES[0] if not interpreted(device, backend) else PatchCase("small", 2, 24, 5, 6, 17, pos="3d")
    x, pos = patch_inputs(case, dtype, device, seed=1, ints=False)
    tokens, index = apkernels.patch_pool(x, case.keep, pos, backend=backend)
    ref_tokens, ref_index = reference.patch_pool(x, case.keep, pos)
    assert_valid_index(index, case.keep, 0, case.N)
    assert_same_selection(index.cpu(), ref_index.cpu(), reference.patch_scores(x, "sum_abs").cpu(), dtype)
    assert_close(tokens, reference.gather_rows(x.flatten(2).transpose(1, 2) + pos, index), dtype)


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
def test_nan_inf_scores(device, backend, dtype):
    """NaN ranks above +inf (torch.sort's order); the indices stay unique and ascending."""
    B, C, H, W, keep = 2, 6, 3, 4, 5
    x = small_ints(B, C, H, W, dtype=dtype, device=device, generator=torch.Generator().manual_seed(2))
    x[0, 1, 2, 3] = float("nan")
    x[0, 0, 0, 1] = float("inf")
    x[0, 4, 1, 1] = float("-inf")
    x[1, 2, 0, 0] = float("nan")
    x[1, :, 2, 2] = float("nan")
    x[1, 3, 1, 0] = float("-inf")
    for score in scores_to_check(reference.PATCH_SCORES, dtype, device, backend):
        tokens, index = apkernels.patch_pool(x, keep, score=score, backend=backend)
        ref_tokens, ref_index = reference.patch_pool(x, keep, None, score)
        assert torch.equal(index, ref_index), score
        assert_valid_index(index, keep, 0, H * W)
        assert_close(tokens, ref_tokens, dtype)
    all_nan = torch.full((1, 3, 2, 3), float("nan"), dtype=dtype, device=device)
    _, index = apkernels.patch_pool(all_nan, 4, backend=backend)
    assert index.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ties_and_signed_zero_go_to_the_lower_position(device, backend):
    x = torch.zeros(1, 4, 3, 3, device=device)
    x[0, :, 0, 1] = -0.0
    for score in reference.PATCH_SCORES:
        _, index = apkernels.patch_pool(x, 4, score=score, backend=backend)
        assert index.tolist() == [[0, 1, 2, 3]], score
    x[0, 0, 2, 2] = 1.0
    _, index = apkernels.patch_pool(x, 3, score="sum", backend=backend)
    assert index.tolist() == [[0, 1, 8]]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_x(device, backend):
    """x as a slice of a larger tensor, and with permuted (neither NCHW nor NHWC) strides."""
    g = torch.Generator().manual_seed(3)
    big = small_ints(3, 10, 6, 7, device=device, generator=g)
    for x in (big[::2, 1:8, 1:5, ::2], big.permute(0, 1, 3, 2), big.transpose(0, 1)[:, :3]):
        tokens, index = apkernels.patch_pool(x, 5, score="sum", backend=backend)
        ref_tokens, ref_index = reference.patch_pool(x, 5, None, "sum")
        assert torch.equal(index, ref_index)
        assert_close(tokens, ref_tokens, torch.float32)


GRAD_CASES = [c for c in PATCH_CASES if c.name in ("paper", "paper_channels_last", "b1_keep1", "keep_all", "odd_c_n", "odd_channels_last")]


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", case_params(GRAD_CASES))
def test_backward_matches_reference(device, backend, dtype, case):
    skip_big(case, device, backend)
    x, pos = patch_inputs(case, dtype, device, seed=4)
    grad = small_ints(case.B, case.keep, case.C, dtype=dtype, device=device, generator=torch.Generator().manual_seed(5))
    runs = (True, False) if pos is not None else (False,)
    if interpreted(device, backend):
        runs = runs[:1]  # the slow Triton interpreter: the first run covers the x (and pos) gradient
    for with_pos in runs:
        leaves = [x.detach().requires_grad_()] + ([pos.detach().requires_grad_()] if with_pos else [])
        ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        tokens, _ = apkernels.patch_pool(leaves[0], case.keep, leaves[1] if with_pos else None, backend=backend)
        ref_tokens, _ = reference.patch_pool(ref_leaves[0], case.keep, ref_leaves[1] if with_pos else None)
        got = torch.autograd.grad(tokens, leaves, grad)
        want = torch.autograd.grad(ref_tokens, ref_leaves, grad)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert_close(a, b, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_fp64(device, backend):
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"the {backend} backend has no fp64 kernels")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
    pos = torch.randn(1, 6, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, p: apkernels.patch_pool(a, 4, p, backend=backend)[0], (x, pos))
    assert torch.autograd.gradcheck(lambda a: apkernels.patch_pool(a, 6, score="max", backend=backend)[0], (xc,))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 3, 5, generator=g).to(device).requires_grad_()
    xc = torch.randn(2, 6, 3, 5, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    pos = torch.randn(15, 6, generator=g).to(device).requires_grad_()
    op = op_for("patch_pool", backend, device)
    for args in ((x, 4, pos[None], "sum_abs"), (xc, 15, None, "max")):
        opcheck(op.default, args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 4, 4, generator=g).to(device).requires_grad_()
    pos = torch.randn(1, 16, 8, generator=g).to(device).requires_grad_()

    def f(x, pos):
        tokens, index = apkernels.patch_pool(x, 5, pos, score="sum_abs", backend=backend)
        return (tokens * tokens).sum(), index

    torch._dynamo.reset()
    loss, index = torch.compile(f, fullgraph=True)(x, pos)
    grads = torch.autograd.grad(loss, (x, pos))
    ref_loss, ref_index = f(x, pos)
    ref_grads = torch.autograd.grad(ref_loss, (x, pos))
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def _bad_patch_args(device):
    x = torch.randn(2, 3, 2, 2, device=device)
    return [
        ((x[0], 1, None, "sum_abs"), "x must be 4-D"),
        ((x.long(), 1, None, "sum_abs"), "x must be a floating-point"),
        ((x[:, :0], 1, None, "sum_abs"), "x must not be empty"),
        ((x, 0, None, "sum_abs"), r"keep must be in \[1, 4\]"),
        ((x, 5, None, "sum_abs"), r"keep must be in \[1, 4\]"),
        ((x, 2, torch.randn(3, 3, device=device), "sum_abs"), "pos must have shape"),
        ((x, 2, torch.randn(2, 4, 3, device=device), "sum_abs"), "pos must have shape"),
        ((x, 2, torch.randn(4, 3, device=device).double(), "sum_abs"), "pos must have the same dtype"),
        ((x, 2, None, "mean"), "score must be one of"),
    ]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_arguments_name_the_argument(device, backend):
    """Called directly (no Python validation in front), the kernel itself rejects bad arguments."""
    op = op_for("patch_pool", backend, device)
    for args, message in _bad_patch_args(device):
        with pytest.raises(ValueError, match=message):
            op(*args)
