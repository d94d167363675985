"""Nsight Compute over the paper-scale fused kernels: step (e) of tools/gpu_check.sh.

    ncu --profile-from-start off --metrics ... --csv --page raw --log-file ncu.csv \\
        python tools/ncu_kernels.py          # profile: one fwd+bwd of every case, after a warm-up
    python tools/ncu_kernels.py --report ncu.csv   # per case: kernels, DRAM bytes, time, GB/s

A case is (op, backend, dtype) at the largest paper batch (B=256), forward + backward once.
Only the region between cudaProfilerStart and cudaProfilerStop is profiled; before each case a
`torch.cuda._sleep` kernel ("spin_kernel") is launched as a marker, so the report can give every
profiled kernel its case from the launch order alone (no NVTX support needed in ncu).
"""
import argparse
import csv
import os
import sys

os.environ.setdefault("APKERNELS_QUIET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 256
BACKENDS = ("cuda", "triton")
DTYPE_NAMES = ("fp32", "bf16")
MARKER = "spin_kernel"
METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
)
UNITS = {  # ncu prints SI multiples
    "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9,
    "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0,
    "%": 1.0, "": 1.0,
}


def cases():
    """(op, backend, dtype name) in profiling order; the backends that cannot run are left out."""
    from benchmarks import specs

    out = []
    for name in specs.OPS:
        for backend in BACKENDS:
            if specs.provider_unavailable(name, backend, "cuda") is None:
                out += [(name, backend, d) for d in DTYPE_NAMES]
    return out


def profile() -> int:
    import torch

    from benchmarks import specs

    if not torch.cuda.is_available():
        print("ncu_kernels: no CUDA device")
        return 2
    dtypes = {specs.dtype_name(d): d for d in (torch.float32, torch.bfloat16)}
    runs = []
    for name, backend, dtype_name in cases():
        spec = specs.OPS[name]
        generator = torch.Generator().manual_seed(0)
        inputs = spec.make_inputs(BATCH, dtypes[dtype_name], "cuda", generator)
        grads = specs.make_grads(spec, inputs, generator)
        run, _ = specs.pass_fn(spec, backend, inputs, "fwd+bwd", grads)
        run()  # warm-up outside the profiled region: Triton compiles, allocator grows
        runs.append(((name, backend, dtype_name), run))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for case, run in runs:
        torch.cuda._sleep(1000)  # the marker kernel
        run()
        print("profiled", *case, flush=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ncu_kernels: {len(runs)} cases at B={BATCH}, fwd+bwd")
    return 0


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_csv(path: str) -> list:
    """ncu's raw page as dicts (metric values in base units: bytes, seconds)."""
    with open(path, newline="", errors="replace") as fh:
        lines = [line for line in fh if not line.startswith("==")]
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    table = list(csv.reader(lines[start:]))
    header, units, body = table[0], table[1], table[2:]
    rows = []
    for values in body:
        row = dict(zip(header, values))
        for metric in METRICS:
            if metric in row:
                unit = units[header.index(metric)] if header.index(metric) < len(units) else ""
                value = _number(row[metric])
                row[metric] = None if value is None else value * UNITS.get(unit, 1.0)
        rows.append(row)
    return rows


def report(path: str) -> int:
    rows = read_csv(path)
    if not rows:
        print(f"ncu report: no kernel rows in {path}")
        return 1
    names = cases()  # the order profile() ran them in: same tree, same build, same machine
    groups, current = [], None
    for row in rows:
        kernel = row.get("Kernel Name", row.get("Function Name", "?"))
        if MARKER in kernel:
            current = {"case": names[len(groups)] if len(groups) < len(names) else (f"case {len(groups)}",), "kernels": []}
            groups.append(current)
        elif current is not None:
            current["kernels"].append(row)
    print(f"{'case':<36} {'kernels':>7} {'DRAM MB':>9} {'us':>9} {'GB/s':>8} {'%peak':>6}")
    for group in groups:
        ks = group["kernels"]
        moved = sum((k.get("dram__bytes_read.sum") or 0) + (k.get("dram__bytes_write.sum") or 0) for k in ks)
        seconds = sum(k.get("gpu__time_duration.sum") or 0 for k in ks)
        peak = max((k.get("dram__throughput.avg.pct_of_peak_sustained_elapsed") or 0 for k in ks), default=0)
        gbps = moved / seconds / 1e9 if seconds else 0.0
        print(f"{' '.join(group['case']):<36} {len(ks):>7} {moved / 1e6:>9.1f} {seconds * 1e6:>9.1f} {gbps:>8.0f} {peak:>5.0f}%")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", metavar="CSV", help="summarise an ncu --csv --page raw log instead of profiling")
    parser.add_argument("--print-metrics", action="store_true", help="print the metric list for ncu --metrics")
    args = parser.parse_args(argv)
    if args.print_metrics:
        print(",".join(METRICS))
        return 0
    return report(args.report) if args.report else profile()


if __name__ == "__main__":
    sys.exit(main())
