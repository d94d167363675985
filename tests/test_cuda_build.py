"""The compiled CUDA pooling kernels are registered whenever _C was built with CUDA (no GPU needed).

The numerical tests of these kernels are the backend-parametrised tests (tests/test_patch_pool.py,
...), which pick the CUDA backend only when a GPU is present; this file checks the build itself.
"""
import pytest
import torch

from apkernels import _backend, _extension, _library

CUDA_POOL_OPS = ("patch_pool", "token_pool", "pool_backward")

built_with_cuda = _extension._C is not None and bool(_extension.build_config().get("cuda"))
pytestmark = pytest.mark.skipif(not built_with_cuda, reason="apkernels._C was not built with CUDA kernels")


@pytest.mark.parametrize("op", CUDA_POOL_OPS)
def test_cuda_kernel_registered(op):
    # A compiled CUDA kernel, not the Python reference fallback (which _extension.NATIVE excludes).
    assert _library.has_kernel(op, "CUDA"), f"apkernels::{op} has no CUDA kernel although _C was built with CUDA"
    assert op in _extension.NATIVE["CUDA"]


@pytest.mark.parametrize("op", ("patch_pool", "token_pool"))
def test_cuda_backend_selected_for_cuda_tensors(op, monkeypatch):
    # Resolving a backend inspects the device type only, so this runs without a GPU.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.available_backends(op, "cuda")[0] == "cuda"
    assert _backend.resolve(op, "auto", torch.device("cuda")) == "cuda"
