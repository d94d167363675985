"""What the Triton kernels compile to for sm_90 (no GPU needed): properties the interpreter cannot
show, such as 32-bit address arithmetic that would overflow at 2^31 elements."""
import re

import pytest
import torch

from tests.utils import run_python_compiled

TTIR_OF_POOL_BACKWARD = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apkernels.triton_kernels import pool_backward
kernel = pool_backward._pool_backward_kernel
pointers = {"grad_ptr": "*bf16", "index_ptr": "*i64", "inv_ptr": "*i32", "rows_ptr": "*bf16", "sum_ptr": "*bf16",
            "partial_ptr": "*fp32", "counters_ptr": "*i32"}
constexprs = {"REDUCE": True, "WORKSPACE": True, "ACC": tl.float32, "BLOCK_R": 1, "BLOCK_C": 64}
signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names}
source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ttir"])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs compile the kernels themselves")
def test_pool_backward_has_no_32bit_product_of_sizes_in_its_addresses():
    # B, N, C, the strides and the chunk size all fit int32 (Triton specialises them as i32) while
    # products such as b * N * C may not: the kernel must form them in 64 bits (it advances 64-bit
    # pointers image by image). The only 32-bit products allowed are a program id's tile times a
    # constexpr block size (a row or channel index, < N or C).
    ttir = run_python_compiled(["-c", TTIR_OF_POOL_BACKWARD])
    constants = dict(re.findall(r"(%[\w#]+) = arith\.constant (\d+) : i32", ttir))
    products = re.findall(r"arith\.muli (%[\w#]+), (%[\w#]+)[^:]*: (i32|tensor<[^>]*xi32>)", ttir)
    assert products, "no 32-bit multiply at all: the check below would not look at anything"
    by_variable = [(lhs, rhs) for lhs, rhs, _ in products if lhs not in constants and rhs not in constants]
    assert not by_variable, by_variable


def test_launchers_run_on_their_tensors_device(monkeypatch):
    # Fake CUDA tensors (no GPU needed): the guard makes the tensors' device current around the
    # launcher, since Triton launches on the current device.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from apkernels.triton_kernels import _common

    entered, seen = [], []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    guarded = _common.on_tensor_device(lambda x, n: seen.append((x.device, n)) or n)
    with FakeTensorMode():
        x = torch.empty(2, 3, device="cuda:1")
    assert guarded(x, 5) == 5
    assert entered == [torch.device("cuda:1")] and seen == [(torch.device("cuda:1"), 5)]
    assert guarded(torch.zeros(1), 7) == 7 and len(entered) == 1  # CPU tensors: no guard
