"""pytest-benchmark set-up for benchmarks/.

    pytest benchmarks --benchmark-only                          # paper shapes, timed
    pytest benchmarks --benchmark-disable -q -p no:cacheprovider  # CI smoke: B=2, each call once

With --benchmark-disable the paper_scale rows are skipped (add --paper-scale to run them once
each) and torch.compile only captures the graph (dynamo backend "eager": an Inductor compile costs
10-90 s per graph on a small CPU) and torch uses one thread. When timing, the B=2 smoke rows are
skipped. Every row checks its result against apkernels.reference, so the smoke run is a
correctness test of the providers.
"""
import os

os.environ.setdefault("APKERNELS_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import checks, specs, timing  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--paper-scale",
        action="store_true",
        default=False,
        help="benchmarks/: run the paper_scale rows even with --benchmark-disable",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "paper_scale: a benchmark at the papers' batch sizes (slow without a GPU)")
    if benchmarks_disabled(config):
        # The smoke run checks results, not speed: one thread avoids OpenMP threads spin-waiting
        # on each other on a busy CI machine (it halves the run there).
        torch.set_num_threads(1)


def benchmarks_disabled(config) -> bool:
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:  # pytest-benchmark not installed: nothing is timed
        return True


def pytest_collection_modifyitems(config, items):
    disabled = benchmarks_disabled(config)
    skip_paper = pytest.mark.skip(reason="paper_scale: timed with --benchmark-only (or add --paper-scale)")
    skip_smoke = pytest.mark.skip(reason="smoke shape: runs with --benchmark-disable")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        paper = item.get_closest_marker("paper_scale") is not None
        if disabled and paper and not config.getoption("--paper-scale"):
            item.add_marker(skip_paper)
        elif not disabled and not paper:
            item.add_marker(skip_smoke)


def synchronized(fn, device):
    """CUDA work is asynchronous: a wall-clock timer must wait for it to finish."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def op_bench(benchmark, request):
    """run(case): time one BenchCase with pytest-benchmark and check its result against the reference."""
    disabled = benchmarks_disabled(request.config)

    def run(case):
        spec = case.spec
        generator = torch.Generator().manual_seed(0)
        inputs = spec.make_inputs(case.batch, case.dtype, case.device, generator)
        grads = specs.make_grads(spec, inputs, generator)
        fn, outputs = specs.pass_fn(
            spec, case.provider, inputs, case.pass_, grads, compile_backend="eager" if disabled else "inductor"
        )
        benchmark.group = case.group
        benchmark.name = case.provider
        traffic = spec.traffic(inputs, outputs, case.pass_)
        benchmark.extra_info.update(
            op=case.op,
            shape=spec.shape(case.batch),
            dtype=specs.dtype_name(case.dtype),
            pass_=case.pass_,
            provider=case.provider,
            traffic_bytes=traffic,
            paper_scale=case.paper_scale,
        )
        result = benchmark(synchronized(fn, case.device))
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
            benchmark.extra_info["gbps"] = traffic / stats.stats.median / 1e9
        if torch.device(case.device).type == "cuda" and not disabled:
            benchmark.extra_info["cuda_event_median_ms"] = timing.time_cuda(fn, reps=50).ms
        checks.assert_matches(spec, case.provider, case.dtype, result, checks.expected_result(spec, inputs, case.pass_, grads))

    return run


@pytest.fixture
def model_benchmark(benchmark, request):
    """run(case): time one ModelCase step (images/s in extra_info) and check its output."""
    from benchmarks import model_bench

    def run(case):
        fn = model_bench.step_fn(case)
        if not benchmarks_disabled(request.config):
            fn()  # warm-up (and the compilation of the "compile" provider)
        benchmark.group = case.group
        benchmark.name = case.provider
        benchmark.extra_info.update(model=case.model, shape=case.shape, pass_=case.pass_, provider=case.provider)
        result = benchmark(synchronized(fn, case.device))
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
            benchmark.extra_info["img_per_s"] = case.batch / stats.stats.median
        model_bench.check_step(case, result)

    return run
