"""Result checks of the benchmark rows: every provider against apkernels.reference (the smoke run
of the benchmarks is a correctness test of the providers)."""
import torch

from apkernels.tolerances import PAPER_SCALE, tolerance

from .specs import OpSpec, pass_fn


def expected_result(spec: OpSpec, inputs: dict, pass_: str, grads):
    """What one call of a pass returns, computed with apkernels.reference: the forward outputs
    ("fwd") or the gradients of the inputs in `spec.grad_names` ("bwd", "fwd+bwd")."""
    _, outputs = pass_fn(spec, "reference", inputs, "fwd")
    if pass_ == "fwd":
        return outputs
    run, _ = pass_fn(spec, "reference", inputs, "fwd+bwd", grads)
    return run()


def assert_matches(spec: OpSpec, provider: str, dtype, result, expected) -> None:
    """A provider's result equals the reference's: kept indices exactly, values within the dtype's
    tolerance. The official formulation scores in the input dtype (the reference in fp32), so its
    selection may legitimately differ below fp32: there only shapes are compared."""
    result = result if isinstance(result, (tuple, list)) else (result,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(result) == len(expected), f"{provider}: {len(result)} results, expected {len(expected)}"
    loose = provider == "eager" and dtype not in (torch.float32, torch.float64)
    atol, rtol = tolerance(dtype, PAPER_SCALE)
    for i, (got, want) in enumerate(zip(result, expected)):
        assert got.shape == want.shape, f"{provider} result {i}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if loose:
            continue
        if not got.is_floating_point():
            assert torch.equal(got.cpu(), want.cpu()), f"{provider} result {i}: kept indices differ from the reference"
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{provider} result {i}: {m}")
