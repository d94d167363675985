"""Smoke run of every op, forward and forward+backward, on every GPU backend against the
reference: step (a) of tools/gpu_check.sh, well under a minute on a GPU.

Each (op, backend, dtype, pass) runs once at the papers' feature sizes with batch 2 (the
benchmarks' smoke shapes and checks: kept indices exactly, values within the dtype's tolerance;
the backward of the pooling ops is pool_backward). One line per check; exit 1 on any failure,
2 when there is nothing to run (no CUDA device and --device cpu not given).

    python tools/gpu_smoke.py                 # CUDA tensors: backends cuda and triton
    python tools/gpu_smoke.py --device cpu    # the same driver on the CPU kernels (a rehearsal)
"""
import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("APKERNELS_QUIET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import checks, specs, suite  # noqa: E402

BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
DTYPES = (torch.float32, torch.bfloat16)
PASSES = ("fwd", "fwd+bwd")


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=tuple(BACKENDS))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False)")
        return 2
    total = failures = 0
    for name, spec in specs.OPS.items():
        for backend in BACKENDS[args.device]:
            why = specs.provider_unavailable(name, backend, args.device)
            if why is not None:
                print(f"skip {name:<17} {backend:<7} {why}", flush=True)
                continue
            for dtype in DTYPES:
                generator = torch.Generator().manual_seed(0)
                inputs = spec.make_inputs(suite.SMOKE_BATCH, dtype, args.device, generator)
                grads = specs.make_grads(spec, inputs, generator)
                for pass_ in PASSES:
                    total += 1
                    tag = f"{name:<17} {backend:<7} {specs.dtype_name(dtype)} {pass_:<7}"
                    start = time.perf_counter()
                    try:
                        run, _ = specs.pass_fn(spec, backend, inputs, pass_, grads)
                        result = run()
                        synchronize(args.device)
                        elapsed = time.perf_counter() - start
                        checks.assert_matches(spec, backend, dtype, result, checks.expected_result(spec, inputs, pass_, grads))
                    except Exception as exc:  # noqa: BLE001  (report every failing check, then go on)
                        failures += 1
                        detail = traceback.format_exception_only(type(exc), exc)[-1].strip().replace("\n", " ")
                        print(f"FAIL {tag} {detail[:400]}", flush=True)
                        continue
                    print(f"ok   {tag} {elapsed * 1e3:8.1f} ms (first call, compile included)", flush=True)
    print(f"gpu_smoke: {total} checks on {args.device} tensors, {failures} failed")
    if total == 0:
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
