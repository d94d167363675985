"""Helpers shared by the model tests: official key lists, synthetic checkpoints, backend choice."""
import json
import os

import pytest
import torch

import apkernels
from tests.utils import DEVICES, FAST_BACKENDS

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def official_keys(name: str) -> list:
    """[(key, shape), ...] of an official checkpoint, in its order (tests/fixtures/<name>)."""
    with open(os.path.join(FIXTURES, name)) as fh:
        return [(key, tuple(shape)) for key, shape in json.load(fh)]


def synthetic_state_dict(keys, seed: int = 0) -> dict:
    """Random tensors with the given (key, shape) layout: small weights, positive running variances,
    integer batch counters, so that a model loaded with them still computes finite values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 1000, shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.02
    return state


def model_backend_params(ops):
    """(device, backend) params: "auto" on every device, plus each fast backend that runs all `ops`
    there (compared against backend="reference", attention="explicit" at model level)."""
    params = []
    for device in DEVICES:
        params.append(pytest.param(device, "auto", id=f"auto-{device}"))
        for backend in FAST_BACKENDS:
            if all(backend in apkernels.available_backends(op, device) for op in ops):
                params.append(pytest.param(device, backend, id=f"{backend}-{device}"))
    return params


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "") -> None:
    """assert_close with the absolute tolerance relative to the largest |expected|: for tensors with
    a wide dynamic range (DAN's untrained heads reach 1e4), where the rounding of the large entries
    exceeds the size of the small ones."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, atol=rel * max(scale, 1.0), rtol=rel,
                               msg=lambda m: f"{name}: {m}")


def assert_grads_close(fast: torch.nn.Module, ref: torch.nn.Module, rel: float, scaled: bool = False,
                       atol: float = 0.0) -> None:
    """Parameter gradients of two models with the same parameter names agree (rtol `rel`, atol
    `atol`, or relative to each gradient's largest entry when `scaled`)."""
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        if scaled:
            assert_close_to_scale(p.grad, q.grad, rel, f"grad of {name}")
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rel, msg=lambda m: f"grad of {name}: {m}")
