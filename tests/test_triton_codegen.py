"""What the Triton kernels compile to for sm_90 (no GPU needed): properties the interpreter cannot
show, such as 32-bit address arithmetic that would overflow at 2^31 elements."""
import re

import pytest
import torch

from tests.utils import run_python_compiled

TTIR_OF_BATCH_SUM = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apkernels.triton_kernels import pool_backward
signature = {"rows_ptr": "*bf16", "sum_ptr": "*bf16", "B": "i32", "numel": "i32", "ACC": "constexpr",
             "BLOCK": "constexpr"}
source = ASTSource(fn=pool_backward._batch_sum_kernel, signature=signature,
                   constexprs={"ACC": tl.float32, "BLOCK": 1024})
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttir"])
"""




@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs compile the kernels themselves")
def test_batch_sum_has_no_32bit_multiply_in_its_addresses():
    # B and numel both fit int32 (Triton specialises them as i32) while B * numel may not: the
    # kernel must not form that product in 32 bits (it walks the rows by advancing its pointers).
    ttir = run_python_compiled(["-c", TTIR_OF_BATCH_SUM])
    products = re.findall(r"arith\.muli .*", ttir)
    assert not [p for p in products if re.search(r"(: i32|xi32>)", p)], products


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
