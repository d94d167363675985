"""Drive every compiled CUDA kernel of apkernels forward and backward at a few shapes (odd ones
included), for compute-sanitizer (tools/gpu_check.sh) and as a quick smoke test on a GPU.

Each call is also compared with apkernels.reference on integer-valued inputs (exact scores, so the
kept indices must match exactly). Exits 1 on any mismatch, 2 when there is no GPU.

    python tools/sanitize_kernels.py            # all shapes (memcheck)
    python tools/sanitize_kernels.py --quick    # fewer, smaller shapes (racecheck / synccheck)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apkernels  # noqa: E402
from apkernels import _extension, reference  # noqa: E402
from apkernels import _library  # noqa: E402
from apkernels.tolerances import PAPER_SCALE, TOL, tolerance  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
failures = []
DEVICE = "cuda"  # --device cpu runs the same driver on the CPU kernels (a check of the driver itself)


def ints(*shape, dtype, low=-4, high=5):
    return torch.randint(low, high, shape, device=DEVICE).to(dtype)


def check(name, got, want, exact=False, tol=TOL[torch.float32]):
    got, want = (t.float().cpu() if t.is_floating_point() else t.cpu() for t in (got, want))
    ok = got.shape == want.shape and (
        torch.equal(got, want) if exact else torch.allclose(got, want, atol=tol[0], rtol=tol[1], equal_nan=True)
    )
    if not ok:
        failures.append(name)
        print(f"MISMATCH {name}: shapes {tuple(got.shape)} vs {tuple(want.shape)}", flush=True)


def native(op):
    return op in _extension.NATIVE[DEVICE.upper()]


def run_patch_pool(quick):
    # (B, C, H, W, keep): B=1, C=1, odd C, N not a power of two, keep=1, keep=N, the opt-in shared
    # memory path (N*8 bytes > 48 KB) and the global-workspace path (N*8 bytes > 227 KB).
    shapes = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 11), (3, 8, 14, 14, 160), (2, 16, 4, 4, 16), (2, 24, 3, 5, 1)]
    if not quick:
        shapes += [(2, 768, 14, 14, 160), (1, 4, 80, 80, 1000), (1, 2, 181, 181, 777)]
    for B, C, H, W, keep in shapes:
        big = B * C * H * W > 20000  # the full dtype x score grid only on the small shapes
        for dtype in (torch.float16,) if quick or big else DTYPES:
            for layout in ("nchw", "channels_last", "sliced"):
                base = ints(B, C, H, W + (1 if layout == "sliced" else 0), dtype=dtype)
                x = base[..., :W] if layout == "sliced" else base
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                for score in ("sum_abs", "max") if quick or big else reference.PATCH_SCORES:
                    for with_pos in (False, True):
                        pos = ints(H * W, C, dtype=dtype) if with_pos else None
                        xg = x.detach().requires_grad_(True)
                        pg = pos.detach().requires_grad_(True) if with_pos else None
                        tag = f"patch_pool{(B, C, H, W, keep)} {dtype} {layout} {score} pos={with_pos}"
                        tokens, index = torch.ops.apkernels.patch_pool(xg, keep, pg, score)
                        want_t, want_i = reference.patch_pool(x, keep, pos, score)
                        check(tag + " index", index, want_i, exact=True)
                        check(tag + " tokens", tokens, want_t, exact=True)
                        grad = ints(*tokens.shape, dtype=dtype)
                        tokens.backward(grad)
                        rows, psum = reference.pool_backward(grad, want_i, H * W, with_pos)
                        check(tag + " grad_x", xg.grad, rows.transpose(1, 2).reshape(B, C, H, W), tol=TOL[dtype])
                        if with_pos:
                            check(tag + " grad_pos", pg.grad, psum, tol=TOL[dtype])


def run_token_pool(quick):
    # (B, N, C, heads, head_dim, keep); q, k are strided views of a [B, N, 3, heads, head_dim] qkv.
    shapes = [(1, 2, 1, 1, 1, 1), (2, 17, 12, 3, 4, 5), (2, 33, 8, 2, 8, 32), (3, 197, 64, 8, 8, 150)]
    if not quick:
        shapes += [(2, 161, 768, 8, 96, 144), (1, 7000, 16, 2, 8, 3000), (1, 30001, 8, 1, 8, 20000)]
    for B, N, C, heads, hd, keep in shapes:
        big = B * N * max(C, heads * hd) > 20000
        for dtype in (torch.bfloat16,) if quick or big else DTYPES:
            qkv = ints(B, N, 3, heads, hd, dtype=dtype, low=-2, high=3)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
            scale = 0.25  # a power of two: the logits stay exact, so the selections must agree
            for x_layout in ("contiguous", "transposed"):
                x = ints(B, N, C, dtype=dtype)
                if x_layout == "transposed":
                    x = x.transpose(1, 2).contiguous().transpose(1, 2)
                for score in ("sum",) if quick or big else reference.TOKEN_SCORES:
                    tag = f"token_pool{(B, N, C, heads, hd, keep)} {dtype} {x_layout} {score}"
                    xg = x.detach().requires_grad_(True)
                    tokens, index = torch.ops.apkernels.token_pool(xg, q, k, keep, scale, score)
                    want_t, want_i = reference.token_pool(x, q, k, keep, scale, score)
                    check(tag + " index", index, want_i, exact=True)
                    check(tag + " tokens", tokens, want_t, exact=True)
                    grad = ints(*tokens.shape, dtype=dtype)
                    tokens.backward(grad)
                    check(tag + " grad_x", xg.grad, reference.pool_backward(grad, want_i, N, False)[0], exact=True)


def run_pool_backward(quick):
    # Direct calls: non-contiguous grad_tokens (scalar path), a permutation index, B=1, K=0.
    for B, K, C, N in [(1, 1, 1, 1), (3, 5, 7, 9), (2, 0, 8, 4), (4, 10, 64, 10)] + ([] if quick else [(5, 100, 768, 196)]):
        for dtype in DTYPES:
            index = torch.stack([torch.randperm(N, device=DEVICE)[:K].sort().values for _ in range(B)])
            for contiguous in (True, False):
                grad = ints(B, K, C, dtype=dtype) if contiguous else ints(B, C, K, dtype=dtype).transpose(1, 2)
                for reduce in (False, True):
                    got = torch.ops.apkernels.pool_backward(grad, index, N, reduce)
                    want = reference.pool_backward(grad, index, N, reduce)
                    tag = f"pool_backward{(B, K, C, N)} {dtype} contiguous={contiguous} reduce={reduce}"
                    check(tag + " rows", got[0], want[0], exact=True)
                    check(tag + " sum", got[1], want[1], tol=TOL[dtype])


def run_dan(quick):
    shapes = [(1, 1, 1, 1, 1, 1), (2, 5, 3, 7, 4, 3)] + ([] if quick else [(4, 512, 7, 7, 4, 256)])
    for B, C, H, W, M, C2 in shapes:
        for dtype in DTYPES if not quick else (torch.float32,):
            tol = tolerance(dtype, PAPER_SCALE)
            x, z = torch.randn(B, C, H, W, device=DEVICE, dtype=dtype), torch.randn(B, M, C2, H, W, device=DEVICE, dtype=dtype)
            tag = f"dan{(B, C, H, W, M, C2)} {dtype}"
            if native("dan_spatial_pool"):
                got_g, got_s = torch.ops.apkernels.dan_spatial_pool(x, z)
                want_g, want_s = reference.dan_spatial_pool(x, z)
                check(tag + " spatial_pool", got_g, want_g, tol=tol)
                check(tag + " spatial_pool maps", got_s, want_s, tol=tol)
            if native("dan_spatial_pool_backward"):
                grad_g = torch.randn(B, M, C, device=DEVICE, dtype=dtype)
                s = reference.dan_spatial_pool(x, z)[1]
                got = torch.ops.apkernels.dan_spatial_pool_backward(grad_g, x, z, s)
                want = reference.dan_spatial_pool_backward(grad_g, x, z, s)
                check(tag + " spatial_pool_backward x", got[0], want[0], tol=tol)
                check(tag + " spatial_pool_backward z", got[1], want[1], tol=tol)
            g, gate = torch.randn(B, M, C, device=DEVICE, dtype=dtype), torch.randn(B, M, C, device=DEVICE, dtype=dtype)
            if native("dan_head_fusion"):
                got = torch.ops.apkernels.dan_head_fusion(g, gate)
                want = reference.dan_head_fusion(g, gate)
                check(tag + " head_fusion fused", got[0], want[0], tol=tol)
                check(tag + " head_fusion heads", got[1], want[1], tol=tol)
            if native("dan_head_fusion_backward"):
                heads = reference.dan_head_fusion(g, gate)[1]
                gf, gh = torch.randn(B, C, device=DEVICE, dtype=dtype), torch.randn(B, M, C, device=DEVICE, dtype=dtype)
                got = torch.ops.apkernels.dan_head_fusion_backward(gf, gh, g, gate, heads)
                want = reference.dan_head_fusion_backward(gf, gh, g, gate, heads)
                check(tag + " head_fusion_backward g", got[0], want[0], tol=tol)
                check(tag + " head_fusion_backward gate", got[1], want[1], tol=tol)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes (for racecheck)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"native {DEVICE} kernels:", sorted(_extension.NATIVE[DEVICE.upper()]), flush=True)
    runs = {
        "patch_pool": run_patch_pool,
        "token_pool": run_token_pool,
        "pool_backward": run_pool_backward,
        "dan": run_dan,
    }
    # Every op of the registry is driven by one of the runs (run_dan: both DAN ops and their backwards).
    driven = {"patch_pool", "token_pool", "pool_backward"} | {
        op for op in _library.SCHEMAS if op.startswith("dan_")
    }
    missing = sorted(set(_library.SCHEMAS) - driven)
    if missing:
        print(f"sanitize_kernels: no driver for {missing}: add a run_<op> here", file=sys.stderr)
        return 1
    for name, fn in runs.items():
        if name == "dan" or native(name) or DEVICE == "cpu":
            print(f"-- {name}", flush=True)
            fn(args.quick)
        else:
            print(f"-- {name}: no compiled CUDA kernel, skipped", flush=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_kernels: {len(failures)} mismatches", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
