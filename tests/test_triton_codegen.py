"""What the Triton kernels compile to for sm_90 (no GPU needed): properties the interpreter cannot
show, such as 32-bit address arithmetic that would overflow at 2^31 elements."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

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


def compile_in_subprocess(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs compile the kernels themselves")
def test_batch_sum_has_no_32bit_multiply_in_its_addresses():
    # B and numel both fit int32 (Triton specialises them as i32) while B * numel may not: the
    # kernel must not form that product in 32 bits (it walks the rows by advancing its pointers).
    ttir = compile_in_subprocess(TTIR_OF_BATCH_SUM)
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
