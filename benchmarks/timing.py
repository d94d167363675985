"""Timing of the benchmark calls: CPU wall clock, CUDA events, peak memory, copy bandwidth."""
import dataclasses
import math
import statistics
import time

import torch


@dataclasses.dataclass
class Timing:
    ms: float
    p20: float
    p80: float
    samples: int


def _quantile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms) -> Timing:
    s = sorted(samples_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def time_cpu(fn, reps: int = 20, min_sample_s: float = 2e-3, warmup: int = 2) -> Timing:
    """Median / p20 / p80 over `reps` samples; each sample averages enough calls to last
    `min_sample_s`, so microsecond ops are not timer noise."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return summarize(samples)


def time_cuda(fn, reps: int = 100, warmup: int = 25) -> Timing:
    """CUDA timing with events: triton.testing.do_bench (which flushes L2 between calls) when
    Triton is importable, else CUDA events around each call after a cache flush."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001  (no triton: own event loop)
        do_bench = None
    if do_bench is not None:
        # do_bench's warmup/rep are milliseconds of GPU time; scale them with the call count asked for
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        med, p20, p80 = do_bench(fn, warmup=max(1, int(once * warmup)), rep=max(1, int(once * reps)), quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, reps)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fn(fn, device, reps: int, min_sample_s: float = 2e-3) -> Timing:
    if torch.device(device).type == "cuda":
        return time_cuda(fn, reps=reps, warmup=max(2, reps // 4))
    return time_cpu(fn, reps=reps, min_sample_s=min_sample_s)


def peak_memory_mb(fn, device) -> float | None:
    """Peak allocated memory (MiB) during one call, inputs included: CUDA's max_memory_allocated.

    On the CPU torch keeps no allocator statistics (and tracemalloc does not see its allocations),
    so this is None ("n/a")."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def copy_bandwidth_gbps(device, megabytes: int = 256, reps: int = 10) -> float:
    """The device's measured copy bandwidth (GB/s, read + write counted): dst.copy_(src)."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, reps=reps, min_sample_s=0.0)
    return 2 * n * 4 / (t.ms * 1e-3) / 1e9


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
