"""pool_backward (the backward of both pooling ops) on every fast backend vs the reference."""
import pytest
import torch
from torch.library import opcheck

from apkernels import reference
from tests.pool_cases import assert_close, backend_dtype_params, op_for
from tests.utils import backend_params, dtypes_for, interpreted, small_ints

BACKENDS = backend_params("pool_backward")
BACKEND_DTYPES = backend_dtype_params("pool_backward")


def unique_index(B, K, num_rows, generator, device, ascending=True):
    """[B, K] distinct rows per batch item (what the pooling ops produce)."""
    rows = torch.stack([torch.randperm(num_rows, generator=generator)[:K] for _ in range(B)])
    return (rows.sort(1).values if ascending else rows).to(device)


# (B, K, C, num_rows): the patch pool (196 rows, keep 160, C 768) and token pool (161 -> 145) of
# the paper, B=1, K=1, K=num_rows, odd C.
SHAPES = [(2, 160, 768, 196), (2, 145, 768, 161), (1, 1, 5, 3), (3, 7, 13, 7), (2, 4, 1, 9), (4, 5, 19, 11)]


@pytest.mark.parametrize("device,backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, backend, dtype, shape):
    B, K, C, num_rows = shape
    if interpreted(device, backend) and C * num_rows > 10_000:
        pytest.skip("paper-scale shapes are left to the compiled backends (Triton interpreter)")
    g = torch.Generator().manual_seed(sum(shape))
    index = unique_index(B, K, num_rows, g, device)
    grad = torch.randn(B, K, C, generator=g).to(device=device, dtype=dtype)
    op = op_for("pool_backward", backend, device)
    for reduce_batch in (True, False):
        rows, total = op(grad, index, num_rows, reduce_batch)
        ref_rows, ref_total = reference.pool_backward(grad, index, num_rows, reduce_batch)
        assert rows.dtype == dtype and rows.shape == (B, num_rows, C)
        assert torch.equal(rows, ref_rows)  # placing values is exact
        assert total.dtype == dtype and total.shape == ref_total.shape
        assert_close(total, ref_total, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs_and_unsorted_index(device, backend):
    g = torch.Generator().manual_seed(1)
    B, K, C, num_rows = 3, 6, 10, 8
    index = unique_index(B, K, num_rows, g, device, ascending=False)
    grads = [
        torch.randn(B, C, K, generator=g).to(device).transpose(1, 2),  # channel stride != 1
        torch.randn(1, 1, C, generator=g).to(device).expand(B, K, C),  # what .sum() sends back
        torch.randn(B, 2 * K, C + 3, generator=g).to(device)[:, ::2, 1:-2],
    ]
    op = op_for("pool_backward", backend, device)
    for grad in grads:
        for idx in (index, index.t().contiguous().t()):
            rows, total = op(grad, idx, num_rows, True)
            ref_rows, ref_total = reference.pool_backward(grad, idx, num_rows, True)
            assert torch.equal(rows, ref_rows)
            assert_close(total, ref_total, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_batch_sum_is_deterministic(device, backend):
    g = torch.Generator().manual_seed(2)
    index = unique_index(16, 40, 50, g, device)
    grad = torch.randn(16, 40, 33, generator=g).to(device)
    op = op_for("pool_backward", backend, device)
    first = op(grad, index, 50, True)[1]
    for _ in range(3):
        assert torch.equal(op(grad, index, 50, True)[1], first)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    g = torch.Generator().manual_seed(3)
    grad, index = torch.randn(2, 4, 6, generator=g).to(device), unique_index(2, 4, 9, g, device)
    opcheck(op_for("pool_backward", backend, device).default, (grad, index, 9, True))
    full = torch.arange(4, device=device).repeat(2, 1)  # K == num_rows
    opcheck(op_for("pool_backward", backend, device).default, (grad, full, 4, False))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_arguments_name_the_argument(device, backend):
    op = op_for("pool_backward", backend, device)
    grad = torch.randn(2, 3, 4, device=device)
    index = torch.tensor([[0, 1, 2], [1, 2, 4]], device=device)
    cases = [
        ((grad[0], index, 5, True), "grad_tokens must be 3-D"),
        ((grad, index.float(), 5, True), "index must be int64"),
        ((grad, index[:, :2], 5, True), "index must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)
    # Index values are data, not arguments' shapes: a RuntimeError on every backend (the contract).
    for args, message in [((grad, index, 4, True), r"index must be in \[0, 4\)"), ((grad, -index, 5, False), r"index must be in \[0, 5\)")]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


# --- the contract, on every backend (the reference defines it) ------------------------------------
# dx[b, p] = sum of grad[b, j] over every j with index[b, j] == p, summed in ascending j
# (deterministic); an index outside [0, num_rows) is a RuntimeError naming `index`; num_rows >= 0
# and empty inputs (K = 0, B = 0) give zeros / empty outputs of the right shape.

CONTRACT_BACKENDS = [p for p in BACKENDS if p.values[1] is not None] + [
    pytest.param("cpu", "reference", id="reference-cpu")
]


def contract_op(backend, device):
    return reference.pool_backward if backend == "reference" else op_for("pool_backward", backend, device)


def scatter_add_by_hand(grad, index, num_rows):
    """The contract written out: a loop over j, in fp64."""
    B, K, C = grad.shape
    rows = torch.zeros(B, num_rows, C, dtype=torch.float64)
    for b in range(B):
        for j in range(K):
            rows[b, index[b, j]] += grad[b, j].double().cpu()
    return rows


@pytest.mark.parametrize("device,backend", CONTRACT_BACKENDS)
def test_contract_repeated_indices_accumulate(device, backend):
    op = contract_op(backend, device)
    index = torch.tensor([[2, 0, 2, 2, 1], [0, 0, 0, 0, 0], [4, 3, 2, 1, 0]], device=device)
    for dtype in dtypes_for(backend if backend != "reference" else "cpu"):
        grad = small_ints(3, 5, 7, dtype=dtype, device=device, generator=torch.Generator().manual_seed(4))
        rows, total = op(grad, index, 6, True)
        expected = scatter_add_by_hand(grad, index, 6)  # small integers: exact in every dtype
        assert rows.dtype == dtype and rows.shape == (3, 6, 7)
        assert torch.equal(rows.cpu().double(), expected), dtype
        assert torch.equal(total.cpu().double(), expected.sum(0)), dtype


@pytest.mark.parametrize("device,backend", CONTRACT_BACKENDS)
def test_contract_sums_in_ascending_j_deterministically(device, backend):
    op = contract_op(backend, device)
    # With big = 2^24 in fp32 accumulation, (big + 1) - big is 0 but (big - big) + 1 is 1: the
    # result shows the summation order. Row 1 gets j = 0, 2, 3 (big, 1, -big) -> 0.
    dtypes = [d for d in dtypes_for(backend if backend != "reference" else "cpu") if d != torch.float16]
    for dtype in dtypes:
        big = 2.0**53 if dtype == torch.float64 else 2.0**24
        grad = torch.tensor([[big, 5.0, 1.0, -big]], dtype=dtype, device=device).unsqueeze(-1)
        index = torch.tensor([[1, 0, 1, 1]], device=device)
        first = op(grad, index, 2, True)
        assert first[0].flatten().tolist() == [5.0, 0.0], dtype
        for _ in range(2):
            again = op(grad, index, 2, True)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("device,backend", CONTRACT_BACKENDS)
def test_contract_out_of_range_index_is_a_runtime_error(device, backend):
    op = contract_op(backend, device)
    grad = torch.randn(2, 3, 4, device=device)
    for bad in (5, -1):
        index = torch.tensor([[0, 1, 2], [1, bad, 4]], device=device)
        with pytest.raises(RuntimeError, match=r"index must be in \[0, 5\)"):
            op(grad, index, 5, True)
        with pytest.raises(RuntimeError, match=r"index must be in \[0, 5\)"):
            op(grad, index, 5, False)


@pytest.mark.parametrize("device,backend", CONTRACT_BACKENDS)
def test_contract_empty_inputs(device, backend):
    op = contract_op(backend, device)
    cases = [  # (B, K, C, num_rows)
        (2, 0, 3, 5),  # nothing kept: zero rows
        (0, 4, 3, 5),  # an empty batch
        (2, 0, 3, 0),  # no rows at all
    ]
    for B, K, C, num_rows in cases:
        grad = torch.randn(B, K, C, device=device)
        index = torch.zeros(B, K, dtype=torch.long, device=device)
        rows, total = op(grad, index, num_rows, True)
        assert rows.shape == (B, num_rows, C) and total.shape == (num_rows, C)
        assert not rows.any() and not total.any()
        rows, empty = op(grad, index, num_rows, False)
        assert rows.shape == (B, num_rows, C) and empty.numel() == 0


# The compiled kernels (CPU, CUDA) accumulate a repeated row in fp32 (fp64 for fp64) and round once,
# on both CUDA paths (16-byte packs: C = 20; scalar: C = 13) with random values.
NATIVE_DTYPES = [p for p in BACKEND_DTYPES if p.values[1] in ("cpu", "cuda")] or [
    pytest.param("cpu", None, torch.float32, marks=pytest.mark.skip(reason="no compiled pool_backward kernel"))
]


def sequential_scatter_add(grad, index, num_rows):
    """rows[b, p] = sum of grad[b, j] over index[b, j] == p, j ascending, accumulated in fp32
    (fp64 for fp64) and rounded once."""
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    B, K, C = grad.shape
    rows = torch.zeros(B, num_rows, C, dtype=acc_dtype)
    for b in range(B):
        for j in range(K):
            rows[b, index[b, j]] += grad[b, j].cpu().to(acc_dtype)
    return rows.to(grad.dtype)


@pytest.mark.parametrize("device,backend,dtype", NATIVE_DTYPES)
def test_native_repeated_rows_round_once(device, backend, dtype):
    g = torch.Generator().manual_seed(5)
    B, K, num_rows = 3, 9, 6
    for channels in (20, 13):
        grad = torch.randn(B, K, channels, generator=g).to(device=device, dtype=dtype)
        index = torch.randint(0, num_rows, (B, K), generator=g)
        index[0, :4] = 2  # a row hit four times
        index[1] = torch.arange(K) % 3  # every hit row repeated, rows 3.. untouched
        index = index.to(device)
        expected = sequential_scatter_add(grad, index.cpu(), num_rows)
        rows, total = op_for("pool_backward", backend, device)(grad, index, num_rows, True)
        assert torch.equal(rows.cpu(), expected)
        assert_close(total.cpu(), expected.double().sum(0).to(dtype), dtype)


# --- the fused CUDA / Triton kernels: batch chunks of the position-embedding gradient -------------
# They split the batch into chunks whose fp32 partial sums the last CTA (program) of a tile adds in
# chunk order. APKERNELS_POOL_BACKWARD_TARGET_CTAS (the CTAs / programs aimed at) puts several images
# in a chunk at these small shapes: B = 17 with 4 chunks is 5 + 5 + 5 + 2 images.
FUSED = [p for p in BACKENDS if p.values[1] in ("cuda", "triton")] or [
    pytest.param("cpu", None, marks=pytest.mark.skip(reason="no CUDA or Triton pool_backward here"))
]


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("batch,target_ctas", [(1, 4), (3, 2), (17, 4), (33, 5)])
def test_batch_chunks_exact_and_deterministic(device, backend, batch, target_ctas, monkeypatch):
    monkeypatch.setenv("APKERNELS_POOL_BACKWARD_TARGET_CTAS", str(target_ctas))
    op = op_for("pool_backward", backend, device)
    g = torch.Generator().manual_seed(batch)
    # (num_rows, C): one tile of 4-channel units; CUDA tiles (256 units) splitting rows (C = 28:
    # 7 units per row, 280 units); scalar units (C = 13).
    for num_rows, C in [(9, 12), (40, 28), (23, 13)]:
        K = 6
        index = torch.randint(0, num_rows, (batch, K), generator=g)
        index[0, 1:3] = index[0, 0]  # a row hit three times
        index = index.to(device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            grad = small_ints(batch, K, C, dtype=dtype, device=device, generator=g)
            rows, total = op(grad, index, num_rows, True)
            expected = scatter_add_by_hand(grad, index.cpu(), num_rows)  # small integers: exact sums
            assert torch.equal(rows.cpu(), expected.to(dtype)), (num_rows, C, dtype)
            assert torch.equal(total.cpu(), expected.sum(0).to(dtype)), (num_rows, C, dtype)
            rows_only, empty = op(grad, index, num_rows, False)
            assert torch.equal(rows_only, rows) and empty.numel() == 0
        noisy = torch.randn(batch, K, C, generator=g).to(device)  # rounding order visible: run twice
        first = op(noisy, index, num_rows, True)
        again = op(noisy, index, num_rows, True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert_close(first[1], reference.pool_backward(noisy, index, num_rows, True)[1], torch.float32)


@pytest.mark.parametrize("device,backend", FUSED)
def test_batch_chunks_non_contiguous_grad(device, backend, monkeypatch):
    monkeypatch.setenv("APKERNELS_POOL_BACKWARD_TARGET_CTAS", "3")
    op = op_for("pool_backward", backend, device)
    g = torch.Generator().manual_seed(7)
    B, K, C, num_rows = 7, 5, 8, 9
    index = unique_index(B, K, num_rows, g, device, ascending=False)
    for grad in (torch.randn(B, C, K, generator=g).to(device).transpose(1, 2),
                 torch.randn(B, 2 * K, C + 4, generator=g).to(device)[:, ::2, 1:-3]):
        rows, total = op(grad, index, num_rows, True)
        ref_rows, ref_total = reference.pool_backward(grad, index, num_rows, True)
        assert torch.equal(rows, ref_rows)
        assert_close(total, ref_total, torch.float32)
