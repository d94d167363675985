"""Shared test helpers: devices, backends, tolerances, exactly-summable inputs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import apkernels
from apkernels.tolerances import TOL  # noqa: F401  ((atol, rtol) per dtype vs the reference)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST_BACKENDS = ("cpu", "cuda", "triton")


def backend_params(op):
    """pytest params (device, backend) for every fast backend that can run `op` here."""
    params = []
    for device in DEVICES:
        for backend in apkernels.available_backends(op, device):
            if backend in FAST_BACKENDS:
                params.append(pytest.param(device, backend, id=f"{backend}-{device}"))
    if not params:
        params.append(pytest.param("cpu", None, marks=pytest.mark.skip(reason=f"no fast backend for {op} here")))
    return params


def dtypes_for(backend):
    """dtypes each backend supports (fp64 only on the CPU kernels)."""
    base = [torch.float32, torch.float16, torch.bfloat16]
    return base + [torch.float64] if backend == "cpu" else base


def small_ints(*shape, dtype=torch.float32, device="cpu", low=-4, high=5, generator=None):
    """Integer-valued floats: their sums and products are exact in every dtype used here, so every
    backend computes bit-identical scores and selections must match exactly (ties included)."""
    return torch.randint(low, high, shape, generator=generator).to(device=device, dtype=dtype)


def interpreted(device, backend) -> bool:
    """True when `backend` runs interpreted or emulated on CPU tensors (the Triton interpreter, the
    CUDA emulator): slow, so tests give it small shapes only and leave the paper-scale grid to the
    compiled backends."""
    return backend in ("triton", "cuda") and torch.device(device).type == "cpu"


ROOT = Path(__file__).resolve().parents[1]


def run_python_compiled(args, **env_updates) -> str:
    """`python ARGS` from the repository root without the Triton interpreter (the tests that compile
    Triton kernels for sm_90 without a GPU): its stdout; a failure shows the end of its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(env_updates)
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
