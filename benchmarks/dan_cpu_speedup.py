"""CPU speed of the fused DAN kernels against DAN's eager official formulation (issue 6 target: >= 2x).

    python benchmarks/dan_cpu_speedup.py [--batch 64] [--threads N] [--repeats 30]

Prints the fastest and the median time of each variant and the speed-ups. Not a test: timings depend
on the machine (on a shared one the fastest run is the steadier figure).
"""
import argparse
import statistics
import time

import torch

import apkernels


def official_spatial_pool(x, z):
    """DAN's code per head: s = relu(z).sum(1, keepdim=True); sa = x * s; global average pool."""
    heads = []
    for m in range(z.shape[1]):
        s = z[:, m].relu().sum(1, keepdim=True)
        heads.append(torch.nn.functional.adaptive_avg_pool2d(x * s, 1).flatten(1))
    return torch.stack(heads, 1)


def official_head_fusion(g, gate_logits):
    """DAN's code: head = g * sigmoid(gate) per head, stack, log_softmax over heads, sum."""
    heads = torch.stack([g[:, m] * torch.sigmoid(gate_logits[:, m]) for m in range(g.shape[1])], 1)
    heads = torch.log_softmax(heads, dim=1)
    return heads.sum(1), heads


def time_ms(fn, repeats):
    """(fastest, median) wall time of fn() in ms, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert "cpu" in apkernels.available_backends("dan_spatial_pool", "cpu"), "build apkernels._C first"
    B, M, C = args.batch, args.heads, 512
    torch.manual_seed(0)
    x = torch.randn(B, C, 7, 7, requires_grad=True)
    z = torch.randn(B, M, C, 7, 7, requires_grad=True)
    g, a = torch.randn(B, M, C, requires_grad=True), torch.randn(B, M, C, requires_grad=True)
    gg = torch.randn(B, M, C)

    def fwd_bwd(fn):
        def run():
            out = fn(x, z)
            torch.autograd.grad(out, (x, z), gg)
        return run

    rows = []
    with torch.no_grad():
        rows.append(("dan_spatial_pool forward",
                     time_ms(lambda: official_spatial_pool(x, z), args.repeats),
                     time_ms(lambda: apkernels.dan_spatial_pool(x, z, backend="cpu"), args.repeats)))
    rows.append(("dan_spatial_pool forward+backward",
                 time_ms(fwd_bwd(official_spatial_pool), args.repeats),
                 time_ms(fwd_bwd(lambda x, z: apkernels.dan_spatial_pool(x, z, backend="cpu")), args.repeats)))
    with torch.no_grad():
        rows.append(("dan_head_fusion forward",
                     time_ms(lambda: official_head_fusion(g, a), args.repeats),
                     time_ms(lambda: apkernels.dan_head_fusion(g, a, backend="cpu"), args.repeats)))
    gf = torch.randn(B, C)

    def fusion_fwd_bwd(fn):
        def run():
            fused, heads = fn(g, a)
            torch.autograd.grad((fused, heads), (g, a), (gf, gg))
        return run

    rows.append(("dan_head_fusion forward+backward",
                 time_ms(fusion_fwd_bwd(official_head_fusion), args.repeats),
                 time_ms(fusion_fwd_bwd(lambda g, a: apkernels.dan_head_fusion(g, a, backend="cpu")), args.repeats)))
    print(f"B={B} M={M} C=C2={C} 7x7, fp32, {torch.get_num_threads()} threads, {args.repeats} runs: fastest / median")
    print(f"{'op':34s} {'eager official ms':>19s} {'apkernels cpu ms':>18s} {'speed-up':>13s}")
    for name, (eager_min, eager_med), (ours_min, ours_med) in rows:
        print(f"{name:34s} {eager_min:8.3f} / {eager_med:8.3f} {ours_min:7.3f} / {ours_med:8.3f}"
              f" {eager_min / ours_min:5.2f}x / {eager_med / ours_med:5.2f}x")

if __name__ == "__main__":
    main()
