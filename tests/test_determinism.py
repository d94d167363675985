"""Determinism of the CPU kernels: outputs and gradients are bit-identical across runs and across
thread counts (torch.set_num_threads(1) vs several threads). Every CPU kernel splits work by image
(or by row block for pool_backward's batch sum, by (image, channel block) for dan_head_fusion) and
reduces in a fixed order inside one task, so the partition into threads cannot change a bit."""
import pytest
import torch

import apkernels
from tests.pool_cases import op_for

pytestmark = pytest.mark.skipif(
    "cpu" not in apkernels.available_backends("patch_pool", "cpu"), reason="the CPU kernels are not built"
)

# Shapes big enough that at::parallel_for hands every thread several tasks.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
THREAD_COUNTS = (1, 3, 4)


def _inputs(op, dtype):
    g = torch.Generator().manual_seed(11)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)
    if op == "patch_pool":
        return (rand(16, 64, 7, 9).contiguous(memory_format=torch.channels_last), 40, rand(63, 64)), {"score": "sum_abs"}
    if op == "token_pool":
        qkv = rand(16, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return (rand(16, 50, 32), qkv[0], qkv[1], 30), {"scale": 0.25, "score": "sum"}
    if op == "dan_spatial_pool":
        return (rand(16, 48, 7, 7), rand(16, 4, 48, 7, 7)), {}
    return (rand(64, 4, 512), rand(64, 4, 512)), {}


def _run(op, dtype):
    """Outputs and gradients (w.r.t. every float input) of one forward + backward on the CPU kernels."""
    args, kwargs = _inputs(op, dtype)
    with_grad = {"patch_pool": (0, 2), "token_pool": (0,)}.get(op, (0, 1))  # x (and pos), or both DAN inputs
    leaves = [a.detach().requires_grad_() if i in with_grad else a for i, a in enumerate(args)]
    outs = getattr(apkernels, op)(*leaves, **kwargs, backend="cpu")
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    floats = [o for o in outs if o.is_floating_point()]
    g = torch.Generator().manual_seed(5)
    grads = torch.autograd.grad(floats, [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad],
                                [torch.randn(o.shape, generator=g).to(dtype) for o in floats])
    return [o.detach() for o in outs] + list(grads)


def _bits(tensors):
    """Exact comparison keys: the raw bytes (so -0.0 != 0.0 and NaNs compare by payload)."""
    return [t.contiguous().view(torch.uint8) if t.is_floating_point() else t for t in tensors]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", ["patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion"])
def test_cpu_kernels_bit_identical_across_runs_and_thread_counts(op, dtype, restore_threads):
    runs = {}
    for threads in THREAD_COUNTS + (THREAD_COUNTS[-1],):  # the last count twice: run-to-run
        torch.set_num_threads(threads)
        runs.setdefault(threads, []).append(_bits(_run(op, dtype)))
    baseline = runs[1][0]
    for threads, results in runs.items():
        for result in results:
            assert len(result) == len(baseline)
            for i, (a, b) in enumerate(zip(result, baseline)):
                assert torch.equal(a, b), f"{op} {dtype}: output/gradient {i} differs with {threads} threads"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_pool_backward_batch_sum_and_repeated_rows_bit_identical(dtype, restore_threads):
    """The batch reduction of pool_backward (pos's gradient) and repeated indices (accumulated)
    over many rows: the same bits with 1 and 4 threads."""
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(24, 300, 40, generator=g).to(dtype)
    index = torch.randint(0, 200, (24, 300), generator=g)  # repeats: rows accumulate
    index[:12] = torch.stack([torch.randperm(400, generator=g)[:300] for _ in range(12)]) % 200
    op = op_for("pool_backward", "cpu", "cpu")
    results = []
    for threads in (1, 4, 4):
        torch.set_num_threads(threads)
        results.append(_bits(op(grad, index, 200, True)))
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            assert torch.equal(a, b)
