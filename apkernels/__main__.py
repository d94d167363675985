"""`python -m apkernels`: environment report, then every op on every backend available here,
checked against the reference (max error, kept indices) and timed with the benchmarks' specs and
timers (`python -m benchmarks` is the full benchmark)."""
import argparse
import platform
import sys

import torch

import apkernels
from apkernels import _backend, _emulation, _extension


def environment_report() -> list:
    cfg = _extension.build_config()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"unavailable ({exc.__class__.__name__})"
    lines = [
        f"apkernels {apkernels.__version__}  python {platform.python_version()}  {platform.machine()}",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda})  triton {triton_version}",
        f"apkernels._C: {'loaded' if _extension._C is not None else f'NOT loaded ({_extension.LOAD_ERROR})'}"
        + (f", built against torch {cfg.get('torch')}" if cfg else ""),
        f"  CPU kernels : {', '.join(sorted(_extension.NATIVE['CPU'])) or 'none'}",
        f"  CUDA kernels: {', '.join(sorted(_extension.NATIVE['CUDA'])) or 'none'}"
        + (f"  (archs {cfg.get('cuda_archs')}, CUDA {cfg.get('cuda')})" if cfg.get("cuda") else ""),
        f"  Triton ops  : {', '.join(sorted(_backend.TRITON_OPS)) or 'none'}"
        + ("  (interpreter)" if _backend.triton_interpreter() else ""),
        f"  CUDA emulation: {_emulation.status()}",
    ]
    if cfg and cfg.get("torch") != torch.__version__:
        lines.append(f"  WARNING: _C was built against torch {cfg.get('torch')}, running {torch.__version__}: rebuild")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append(f"devices: cpu only ({torch.get_num_threads()} threads); CUDA rows are skipped")
    return lines


def demo_cases(device, batch):
    """Paper-scale inputs for each op, the benchmarks' op specs: (name, shape, call(backend) -> outputs)."""
    from benchmarks import specs  # the repository's benchmark package (not installed with apkernels)

    g = torch.Generator().manual_seed(0)
    cases = []
    for name, spec in specs.OPS.items():
        inputs = spec.make_inputs(batch, torch.float32, device, g)
        cases.append((name, spec.shape(batch), lambda b, spec=spec, inputs=inputs: spec.kernel(inputs, b)))
    return cases


def max_error(out, ref) -> str:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    parts = []
    for o, r in zip(outs, refs):
        if o.dtype == torch.long:
            parts.append("index " + ("equal" if torch.equal(o.cpu(), r.cpu()) else "DIFFERENT"))
        else:
            parts.append(f"max err {(o.double() - r.double()).abs().max().item():.1e}")
    return ", ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--check-build",
        action="store_true",
        help="only check the build: exit 1 unless _C loaded with every CPU kernel (and every CUDA "
        "kernel where torch is a CUDA build and nvcc is on PATH)",
    )
    args = parser.parse_args(argv)
    if args.check_build:
        problems = _extension.build_problems()
        for problem in problems:
            print(f"apkernels build check FAILED: {problem}", file=sys.stderr)
        if problems:
            raise SystemExit(1)
        print(
            f"apkernels build check: _C loaded; CPU kernels {len(_extension.NATIVE['CPU'])}, "
            f"CUDA kernels {len(_extension.NATIVE['CUDA'])} (expected: "
            f"{'yes' if _extension.cuda_kernels_expected() else 'no'})"
        )
        return
    print("\n".join(environment_report()))
    try:
        from benchmarks import timing
    except ImportError:
        print("\nthe op table needs the repository's benchmarks package: run from the repository root")
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"\n{'op':<18}{'shape':<36}{'device':<7}{'backend':<10}{'median ms':>10}  check vs reference")
    for device in devices:
        for op, shape, call in demo_cases(device, args.batch):
            ref = call("reference")
            for backend in apkernels.available_backends(op, device):
                if backend in ("triton", "cuda") and device == "cpu":
                    why = "interpreter" if backend == "triton" else "CUDA emulator"
                    print(f"{op:<18}{shape:<36}{device:<7}{backend:<10}{'-':>10}  skipped ({why}: see tests)")
                    continue
                out = call(backend)
                ms = timing.time_fn(lambda: call(backend), device, reps=5).ms
                check = "reference itself" if backend == "reference" else max_error(out, ref)
                print(f"{op:<18}{shape:<36}{device:<7}{backend:<10}{ms:>10.3f}  {check}")


if __name__ == "__main__":
    main()
