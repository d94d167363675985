"""token_pool: eager (official) vs torch.compile(reference) vs the apkernels backends, fwd / bwd / fwd+bwd.

Grouped per (shape, dtype, pass, device) so pytest-benchmark's table shows the providers side by side."""
import pytest

from benchmarks.suite import pytest_params


@pytest.mark.parametrize("case", pytest_params("token_pool"))
def test_token_pool(case, op_bench):
    op_bench(case)
