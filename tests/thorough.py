"""The thorough property profile: many random shapes per op and backend, forward and backward.

    python -m tests.thorough                      # >= 1000 shapes per op per CPU backend, 100 in Triton
    python -m tests.thorough --count 50 --triton-count 5 --seed 3 --ops patch_pool

Every op (patch_pool, token_pool, pool_backward, dan_spatial_pool, dan_head_fusion) runs on every
backend `apkernels.available_backends(op, "cpu")` lists (cpu, the emulated CUDA build when it is
built, triton when TRITON_INTERPRET=1, reference). Case i of an op is drawn from (seed, op, i) only,
so every backend sees the same shapes and a failure is reproduced with --seed/--ops/--first.

Shapes are drawn to hit the edges: odd sizes, B = 1, keep = 1 and keep = N, N = 1, ties
(integer-valued inputs), NaN / +-inf, non-contiguous strides, channels_last, fp16 / bf16 / fp32 and
fp64 where the backend has it. Checks:
- fast backends against the reference: kept indices exactly (a swap of equal-within-rounding scores
  only for random floats), values, and the gradients of a random upstream gradient;
- the reference against an independent oracle: Python-sorted selection keys, fp64 formulas, the
  explicit ``reference.*_backward`` functions (the fallback kernels) against fp64 autograd.
Prints a table of shapes checked and mismatches per (op, backend); exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton defines its kernels: runs them on CPU tensors
os.environ.setdefault("APKERNELS_QUIET", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import apkernels  # noqa: E402
from apkernels import reference  # noqa: E402
from tests.pool_cases import assert_same_selection, op_for  # noqa: E402
from apkernels.tolerances import TOL  # noqa: E402
from tests.utils import dtypes_for  # noqa: E402

OPS = ("patch_pool", "token_pool", "pool_backward", "dan_spatial_pool", "dan_head_fusion")
LAYOUTS = ("contiguous", "contiguous", "strided", "permuted", "channels_last")
SPECIALS = (float("nan"), float("inf"), float("-inf"))
EXACT_SCALES = (1.0, 0.5, 0.125, -0.25)  # powers of two: integer logits stay exact


# ---------------------------------------------------------------------------------------------
# drawing inputs
# ---------------------------------------------------------------------------------------------

def case_rng(seed: int, op: str, i: int) -> random.Random:
    return random.Random(f"{seed}:{op}:{i}")  # str seeds hash with SHA-512: stable across processes


def draw_size(rng: random.Random, hi: int) -> int:
    """1, hi, anything between (small and odd sizes are the common edge cases), and now and then up
    to 4 hi (past the kernels' vector widths, tiles and warps)."""
    r = rng.random()
    if r < 0.15:
        return 1
    if r < 0.3:
        return hi
    if r < 0.4:
        return rng.randint(hi + 1, 4 * hi)
    return rng.randint(1, hi)


def draw_keep(rng: random.Random, n: int) -> int:
    return rng.choice((1, n, rng.randint(1, n), rng.randint(1, n)))


@dataclass
class Values:
    """How a case's tensors are filled: integer-valued (exact sums, ties everywhere) or random
    floats; NaN / inf sprinkled in or not; the dtype; the memory layout."""
    ints: bool
    specials: bool
    dtype: torch.dtype
    layout: str
    gen: torch.Generator

    def make(self, *shape, special=True, low=-2, high=3):
        if self.ints:
            t = torch.randint(low, high, shape, generator=self.gen).to(self.dtype)
        else:
            t = torch.randn(*shape, generator=self.gen).to(self.dtype)
        if self.specials and special and t.numel():
            flat = t.view(-1)
            for _ in range(int(torch.randint(1, 4, (), generator=self.gen))):
                at = int(torch.randint(0, flat.numel(), (), generator=self.gen))
                flat[at] = SPECIALS[int(torch.randint(0, 3, (), generator=self.gen))]
        return t


def draw_values(rng: random.Random, backend: str, allow_specials: bool = True) -> Values:
    dtypes = dtypes_for(backend) if backend != "reference" else dtypes_for("cpu")
    return Values(ints=rng.random() < 0.6, specials=allow_specials and rng.random() < 0.2,
                  dtype=rng.choice(dtypes), layout=rng.choice(LAYOUTS),
                  gen=torch.Generator().manual_seed(rng.getrandbits(62)))


def with_layout(t: torch.Tensor, layout: str, rng: random.Random) -> torch.Tensor:
    """The same values as t in another memory layout (a view with other strides)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided" and t.dim() >= 1:
        dim = rng.randrange(t.dim())
        shape = list(t.shape)
        shape[dim] *= 2
        big = t.new_full(shape, 7)  # junk between the kept elements
        view = big[(slice(None),) * dim + (slice(1, None, 2),)]
        view.copy_(t)
        return view
    if layout == "permuted" and t.dim() >= 2:
        perm = list(range(t.dim()))
        rng.shuffle(perm)
        inverse = [perm.index(d) for d in range(t.dim())]
        return t.permute(perm).contiguous().permute(inverse)
    return t


def upstream_grad(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(out.shape, generator=gen).to(out.dtype)


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

def close(actual, expected, dtype, what: str, scale: float = 1.0) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale, equal_nan=True,
                               check_dtype=True, msg=lambda m: f"{what}: {m}")


def oracle_select(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The selection rule written out: NaN first, then descending score, ties to the lower
    position (-0.0 == 0.0 in Python); the kept positions in ascending order."""
    rows = []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda p: (0 if math.isnan(row[p]) else 1, -row[p], p))
        rows.append(sorted(order[:keep]))
    return torch.tensor(rows, dtype=torch.long).reshape(scores.shape[0], keep)


def check_selection(index, expected, scores, dtype, ints: bool, what: str) -> None:
    if ints:
        assert torch.equal(index, expected), f"{what}: index {index.tolist()} != {expected.tolist()}"
    else:
        assert_same_selection(index, expected, scores.double(), dtype)


def grads_of(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


def gather_index_add(rows_grad_shape, grad_tokens, index):
    """Oracle gradient of a row gather: dx[b, index[b, j]] += grad[b, j] (fp64)."""
    out = torch.zeros(rows_grad_shape, dtype=torch.float64)
    for b in range(index.shape[0]):
        out[b].index_add_(0, index[b], grad_tokens[b].double())
    return out


# ---------------------------------------------------------------------------------------------
# one case per op
# ---------------------------------------------------------------------------------------------

def case_patch_pool(rng, backend):
    v = draw_values(rng, backend)
    B, C, H, W = draw_size(rng, 4), draw_size(rng, 19), draw_size(rng, 7), draw_size(rng, 9)
    N = H * W
    keep = draw_keep(rng, N)
    score = rng.choice(reference.PATCH_SCORES)
    x = with_layout(v.make(B, C, H, W), v.layout, rng).requires_grad_()
    pos_kind = rng.choice((None, "2d", "3d"))
    pos = None if pos_kind is None else v.make(*((N, C) if pos_kind == "2d" else (1, N, C)), special=False)
    if pos is not None:
        pos = with_layout(pos, rng.choice(LAYOUTS), rng).requires_grad_()
    desc = f"x {tuple(x.shape)} {v.layout} keep={keep} pos={pos_kind} score={score} {v.dtype} ints={v.ints} nonfinite={v.specials}"
    inputs = [x] + ([pos] if pos is not None else [])
    tokens, index = apkernels.patch_pool(x, keep, pos, score=score, backend=backend)
    grad = upstream_grad(tokens, v.gen)
    got_grads = grads_of(tokens, inputs, grad)
    scores = reference.patch_scores(x.detach(), score)
    rows = x.detach().flatten(2).transpose(1, 2)
    if pos is not None:
        rows = rows + pos.detach().reshape(N, C)
    if backend == "reference":
        check_selection(index, oracle_select(scores, keep), scores, v.dtype, v.ints, desc)
        close(tokens, torch.stack([rows[b, index[b]] for b in range(B)]), v.dtype, desc + " tokens")
        want = gather_index_add((B, N, C), grad, index)
        want_grads = [want.transpose(1, 2).reshape(B, C, H, W)] + ([want.sum(0).reshape(pos.shape)] if pos is not None else [])
        for got, exp in zip(got_grads, want_grads):
            close(got, exp.to(v.dtype), v.dtype, desc + " grad")
        return desc
    ref_tokens, ref_index = reference.patch_pool(x.detach(), keep, None if pos is None else pos.detach(), score)
    check_selection(index, ref_index, scores, v.dtype, v.ints, desc)
    close(tokens, reference.gather_rows(rows, index), v.dtype, desc + " tokens")
    # Gradients against the reference's autograd through the backend's own selection.
    xr = x.detach().clone().requires_grad_()
    pr = None if pos is None else pos.detach().clone().requires_grad_()
    rows_r = xr.flatten(2).transpose(1, 2) + (0 if pr is None else pr.reshape(N, C))
    want_grads = grads_of(reference.gather_rows(rows_r, index), [xr] + ([pr] if pr is not None else []), grad)
    for got, exp in zip(got_grads, want_grads):
        close(got, exp, v.dtype, desc + " grad")
    return desc


def case_token_pool(rng, backend):
    v = draw_values(rng, backend)
    B, N, C, heads, D = draw_size(rng, 4), 1 + draw_size(rng, 30), draw_size(rng, 13), draw_size(rng, 4), draw_size(rng, 17)
    keep = draw_keep(rng, N - 1)
    score = rng.choice(reference.TOKEN_SCORES)
    scale = rng.choice(EXACT_SCALES + (D ** -0.5,))
    x = with_layout(v.make(B, N, C, special=False), v.layout, rng).requires_grad_()
    if rng.random() < 0.5:  # q, k as strided views of one qkv tensor, as APViT's attention makes them
        q, k = v.make(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)[:2]
        qk_layout = "qkv-view"
    else:
        qk_layout = rng.choice(LAYOUTS)
        q, k = (with_layout(v.make(B, heads, N, D), qk_layout, rng) for _ in range(2))
    desc = (f"x {tuple(x.shape)} {v.layout} qk [{heads}, {D}] {qk_layout} keep={keep} scale={scale} "
            f"score={score} {v.dtype} ints={v.ints} nonfinite={v.specials}")
    tokens, index = apkernels.token_pool(x, q, k, keep, scale=scale, score=score, backend=backend)
    grad = upstream_grad(tokens, v.gen)
    (got_grad,) = grads_of(tokens, [x], grad)
    scores = reference.token_scores(q, k, scale, score)
    assert bool((index[:, 0] == 0).all()), f"{desc}: CLS not kept first"
    if backend == "reference":
        # The oracle scores in fp64 from explicit per-head dot products (exact for integer inputs).
        logits = torch.stack([(q[:, h, 0].double()[:, None, :] * k[:, h, 1:].double()).sum(-1) for h in range(heads)], 1) * scale
        oracle_scores = {"sum": logits.sum(1), "sum_abs": logits.abs().sum(1), "max": logits.amax(1)}[score]
        if v.ints and not v.specials and scale in EXACT_SCALES:  # then every score is exact in fp32
            assert torch.equal(scores.double(), oracle_scores), f"{desc}: scores"
        check_selection(index[:, 1:] - 1, oracle_select(scores, keep), scores, v.dtype, v.ints, desc)
        close(tokens, torch.stack([x.detach()[b, index[b]] for b in range(B)]), v.dtype, desc + " tokens")
        close(got_grad, gather_index_add((B, N, C), grad, index).to(v.dtype), v.dtype, desc + " grad")
        return desc
    ref_tokens, ref_index = reference.token_pool(x.detach(), q, k, keep, scale, score)
    check_selection(index[:, 1:], ref_index[:, 1:], torch.cat([scores.new_zeros(B, 1), scores], 1), v.dtype, v.ints, desc)
    close(tokens, reference.gather_rows(x.detach(), index), v.dtype, desc + " tokens")
    xr = x.detach().clone().requires_grad_()
    (want_grad,) = grads_of(reference.gather_rows(xr, index), [xr], grad)
    close(got_grad, want_grad, v.dtype, desc + " grad")
    return desc


def case_pool_backward(rng, backend):
    v = draw_values(rng, backend)
    B, C, num_rows = rng.choice((0, 1, draw_size(rng, 4))), draw_size(rng, 19), draw_size(rng, 40)
    K = rng.choice((0, 1, num_rows, rng.randint(1, num_rows)))
    reduce_batch = rng.random() < 0.5
    grad = with_layout(v.make(B, K, C), v.layout, rng)
    repeats = rng.random() < 0.3  # a repeated index accumulates (the true gradient of a gather)
    if repeats:
        index = torch.randint(0, num_rows, (B, K), generator=v.gen)
    else:
        index = torch.stack([torch.randperm(num_rows, generator=v.gen)[:K] for _ in range(B)]) if B else \
            torch.zeros(0, K, dtype=torch.long)
    index = with_layout(index, rng.choice(("contiguous", "strided", "permuted")), rng)
    desc = (f"grad {tuple(grad.shape)} {v.layout} num_rows={num_rows} repeats={repeats} reduce_batch={reduce_batch} "
            f"{v.dtype} nonfinite={v.specials}")
    op = reference.pool_backward if backend == "reference" else op_for("pool_backward", backend, "cpu")
    rows, total = op(grad, index, num_rows, reduce_batch)
    want_rows = gather_index_add((B, num_rows, C), grad, index)
    assert rows.shape == want_rows.shape and rows.dtype == v.dtype, f"{desc}: rows {tuple(rows.shape)} {rows.dtype}"
    if repeats:
        close(rows, want_rows.to(v.dtype), v.dtype, desc + " rows", scale=max(1, K))
    else:  # a copy: exact
        assert torch.equal(rows.double().nan_to_num(7.5), want_rows.nan_to_num(7.5)), f"{desc}: rows differ"
    if reduce_batch:
        close(total, want_rows.sum(0).to(v.dtype), v.dtype, desc + " batch sum", scale=max(1, B))
    else:
        assert total.numel() == 0, f"{desc}: a batch sum without reduce_batch"
    return desc


def case_dan_spatial_pool(rng, backend):
    v = draw_values(rng, backend)
    B, C, M, C2, H, W = (draw_size(rng, 4), draw_size(rng, 24), draw_size(rng, 4), draw_size(rng, 12),
                         draw_size(rng, 8), draw_size(rng, 8))
    x = with_layout(v.make(B, C, H, W), v.layout, rng).requires_grad_()
    z_layout = rng.choice(LAYOUTS)
    z = with_layout(v.make(B, M, C2, H, W), z_layout, rng).requires_grad_()
    desc = f"x {tuple(x.shape)} {v.layout} z {tuple(z.shape)} {z_layout} {v.dtype} ints={v.ints} nonfinite={v.specials}"
    out = apkernels.dan_spatial_pool(x, z, backend=backend)
    grad = upstream_grad(out, v.gen)
    got_grads = grads_of(out, [x, z], grad)
    # Tolerances scale with the reduction lengths (C2 channels into s, H*W positions into the mean).
    scale = max(1.0, math.sqrt(C2 * H * W) / 4)
    if backend == "reference":
        x64, z64 = x.detach().double().requires_grad_(), z.detach().double().requires_grad_()
        want = (x64.unsqueeze(1) * z64.relu().sum(2).unsqueeze(2)).mean((3, 4))
        close(out, want.to(v.dtype), v.dtype, desc + " forward", scale)
        want_grads = grads_of(want, [x64, z64], grad.double())
        explicit = reference.dan_spatial_pool_backward(grad, x.detach(), z.detach(),
                                                       reference.dan_spatial_pool(x.detach(), z.detach())[1])
        for got, exp, name in zip(got_grads + explicit, want_grads * 2, ("grad_x", "grad_z") * 2):
            close(got, exp.to(v.dtype), v.dtype, f"{desc} {name}", scale)
        return desc
    xr, zr = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    want = reference.dan_spatial_pool(xr, zr)[0]
    close(out, want, v.dtype, desc + " forward", scale)
    for got, exp, name in zip(got_grads, grads_of(want, [xr, zr], grad), ("grad_x", "grad_z")):
        close(got, exp, v.dtype, f"{desc} {name}", scale)
    return desc


def case_dan_head_fusion(rng, backend):
    v = draw_values(rng, backend)
    B, M, C = draw_size(rng, 5), draw_size(rng, 6), draw_size(rng, 70)
    g = with_layout(v.make(B, M, C), v.layout, rng).requires_grad_()
    a_layout = rng.choice(LAYOUTS)
    a = with_layout(v.make(B, M, C), a_layout, rng).requires_grad_()
    desc = f"g {tuple(g.shape)} {v.layout} gate_logits {a_layout} {v.dtype} ints={v.ints} nonfinite={v.specials}"
    fused, heads = apkernels.dan_head_fusion(g, a, backend=backend)
    grad_f, grad_h = upstream_grad(fused, v.gen), upstream_grad(heads, v.gen)
    got_grads = grads_of([fused, heads], [g, a], [grad_f, grad_h])
    scale = max(1.0, M / 2)
    if backend == "reference":
        g64, a64 = g.detach().double().requires_grad_(), a.detach().double().requires_grad_()
        h64 = g64 * torch.sigmoid(a64)
        if M > 1:
            h64 = torch.log_softmax(h64, 1)
        want = [h64.sum(1), h64]
        for got, exp, name in zip((fused, heads), want, ("fused", "heads")):
            close(got, exp.to(v.dtype), v.dtype, f"{desc} {name}", scale)
        want_grads = grads_of(want, [g64, a64], [grad_f.double(), grad_h.double()])
        explicit = reference.dan_head_fusion_backward(grad_f, grad_h, g.detach(), a.detach(), heads.detach())
        for got, exp, name in zip(got_grads + explicit, want_grads * 2, ("grad_g", "grad_gate") * 2):
            close(got, exp.to(v.dtype), v.dtype, f"{desc} {name}", scale)
        return desc
    gr, ar = g.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    want = reference.dan_head_fusion(gr, ar)
    for got, exp, name in zip((fused, heads), want, ("fused", "heads")):
        close(got, exp, v.dtype, f"{desc} {name}", scale)
    for got, exp, name in zip(got_grads, grads_of(list(want), [gr, ar], [grad_f, grad_h]), ("grad_g", "grad_gate")):
        close(got, exp, v.dtype, f"{desc} {name}", scale)
    return desc


CASES = {"patch_pool": case_patch_pool, "token_pool": case_token_pool, "pool_backward": case_pool_backward,
         "dan_spatial_pool": case_dan_spatial_pool, "dan_head_fusion": case_dan_head_fusion}


# ---------------------------------------------------------------------------------------------
# the profile
# ---------------------------------------------------------------------------------------------

@dataclass
class Tally:
    shapes: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    failures: list = field(default_factory=list)  # (case number, description + error)


def backends_for(op: str) -> list:
    return apkernels.available_backends(op, "cpu")


def run_profile(count: int, triton_count: int, seed: int = 0, ops=OPS, first: int = 0,
                show_progress: bool = True, backends=None) -> dict:
    """{(op, backend): Tally} over `count` cases per op and backend (`triton_count` in the Triton
    interpreter), cases first .. first+count-1; `backends` limits the backends (default: all here)."""
    tallies = {}
    for op in ops:
        for backend in backends_for(op):
            if backends is not None and backend not in backends:
                continue
            n = triton_count if backend == "triton" else count
            tally = tallies[op, backend] = Tally()
            t0 = time.perf_counter()
            for i in tqdm(range(first, first + n), desc=f"{op} {backend}", disable=not show_progress, leave=False):
                rng = case_rng(seed, op, i)
                try:
                    CASES[op](rng, backend)
                except Exception as exc:  # noqa: BLE001 - every failure is a mismatch to report
                    tally.mismatches += 1
                    tally.failures.append((i, f"{type(exc).__name__}: {exc}"))
                tally.shapes += 1
            tally.seconds = time.perf_counter() - t0
    return tallies


def format_table(tallies: dict) -> str:
    lines = [f"{'op':<18} {'backend':<10} {'shapes':>7} {'mismatches':>11} {'seconds':>8}"]
    for (op, backend), t in tallies.items():
        lines.append(f"{op:<18} {backend:<10} {t.shapes:>7} {t.mismatches:>11} {t.seconds:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.thorough", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000, help="shapes per op per backend (default 1000)")
    p.add_argument("--triton-count", type=int, default=100, help="shapes per op in the Triton interpreter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", type=int, default=0, help="first case number (to rerun a failure alone)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                   help="only these backends (default: every backend that runs on CPU tensors here)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tallies = run_profile(args.count, args.triton_count, args.seed, args.ops, args.first, backends=args.backends)
    print(format_table(tallies))
    total = sum(t.mismatches for t in tallies.values())
    for (op, backend), t in tallies.items():
        for i, message in t.failures[:5]:
            print(f"FAIL {op} {backend} case {i} (--seed {args.seed} --ops {op} --first {i} --count 1): "
                  f"{message[:600]}")
    print(f"{sum(t.shapes for t in tallies.values())} shapes, {total} mismatches, seed {args.seed}, "
          f"torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
