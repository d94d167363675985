"""APViT and DAN: official-style eager vs apkernels models (eager, compiled), inference and one
training step; APViT batch-1 latency with pooling vs every token kept. The smoke run uses the
tiny models; the paper-size models carry the paper_scale mark."""
import pytest

from benchmarks import model_bench


@pytest.mark.parametrize("case", model_bench.pytest_params())
def test_model(case, model_benchmark):
    model_benchmark(case)
