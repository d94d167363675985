"""What is benchmarked and how it is timed, shared by the pytest-benchmark suites and
`python -m benchmarks`.

An op benchmark is (op spec, batch, dtype, device, pass, provider):
- the op specs (`OPS`) build paper-shaped inputs, run each provider and count the minimal traffic
  (every input read once, every output written once) of each pass;
- providers: "eager" (the official formulation, `benchmarks.official`), "compile"
  (`torch.compile` of `apkernels.reference`), and the apkernels backends available on the device
  ("cuda", "triton", "cpu", and "reference", the dispatcher path without a fast kernel). Triton
  never runs in the interpreter here: on CPU tensors it is skipped;
- passes: "fwd" (under no_grad), "bwd" (autograd.grad of one retained forward) and "fwd+bwd".
"""
import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

import apkernels
from apkernels import _backend, reference

from . import official

PASSES = ("fwd", "bwd", "fwd+bwd")
BASELINES = ("eager", "compile")
KERNEL_PROVIDERS = ("cuda", "triton", "cpu", "reference")
PROVIDERS = BASELINES + KERNEL_PROVIDERS

# Shapes of the papers' RAF-DB configurations (SPEC 1.2, 1.3, 2.2).
APVIT_CHANNELS, APVIT_GRID, APVIT_KEEP = 768, 14, 160
APVIT_TOKENS, APVIT_HEADS, APVIT_HEAD_DIM, APVIT_TOKEN_KEEP = 161, 8, 96, 144
DAN_CHANNELS, DAN_GRID, DAN_HEADS = 512, 7, 4

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# torch.compile specialises on every shape and dtype: one process compiles many variants.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, max(getattr(torch._dynamo.config, _name), 256))


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: its batch sizes, inputs, providers and minimal traffic."""

    name: str
    family: str  # "APViT" or "DAN"
    batches: tuple  # paper batch sizes
    target_batch: int  # batch of the CPU speed-up targets
    describe: Callable  # batch -> shape label
    make_inputs: Callable  # (batch, dtype, device, generator) -> dict of tensors
    grad_names: tuple  # inputs that receive gradients
    eager: Callable  # official formulation: inputs -> outputs
    reference: Callable  # apkernels.reference formulation (compiled for "compile")
    kernel: Callable  # (inputs, backend) -> outputs of the public apkernels op
    traffic: Callable  # (inputs, outputs, pass) -> bytes

    def shape(self, batch: int) -> str:
        return self.describe(batch)


def _randn(generator, *shape, dtype, device):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def float_outputs(outputs) -> tuple:
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return tuple(o for o in outs if o.is_floating_point())


# ----------------------------------------------------------------------------------- patch_pool
def _patch_inputs(batch, dtype, device, generator):
    x = _randn(generator, batch, APVIT_CHANNELS, APVIT_GRID, APVIT_GRID, dtype=dtype, device=device)
    pos = _randn(generator, APVIT_GRID * APVIT_GRID, APVIT_CHANNELS, dtype=dtype, device=device)
    return {"x": x, "pos": pos}


def _patch_traffic(inp, out, pass_):
    x, pos = inp["x"], inp["pos"]
    tokens, index = out[0], out[1]
    fwd = nbytes(x, pos, tokens, index)
    # backward: read grad_tokens and index, write grad_x and grad_pos
    bwd = nbytes(tokens, index, x, pos)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


PATCH_POOL = OpSpec(
    name="patch_pool",
    family="APViT",
    batches=(1, 32, 256),
    target_batch=32,
    describe=lambda b: f"B={b} {APVIT_CHANNELS}x{APVIT_GRID}x{APVIT_GRID}->{APVIT_KEEP}",
    make_inputs=_patch_inputs,
    grad_names=("x", "pos"),
    eager=lambda i: official.patch_pool(i["x"], APVIT_KEEP, i["pos"]),
    reference=lambda x, pos: reference.patch_pool(x, APVIT_KEEP, pos),
    kernel=lambda i, backend: apkernels.patch_pool(i["x"], APVIT_KEEP, i["pos"], backend=backend),
    traffic=_patch_traffic,
)


# ----------------------------------------------------------------------------------- token_pool
def _token_inputs(batch, dtype, device, generator):
    x = _randn(generator, batch, APVIT_TOKENS, APVIT_CHANNELS, dtype=dtype, device=device)
    # q and k are strided views of one qkv tensor, as inside the ViT block
    qkv = _randn(generator, batch, APVIT_TOKENS, 3, APVIT_HEADS, APVIT_HEAD_DIM, dtype=dtype, device=device)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    return {"x": x, "q": qkv[0], "k": qkv[1]}


def _token_traffic(inp, out, pass_):
    x, q, k = inp["x"], inp["q"], inp["k"]
    tokens, index = out[0], out[1]
    fwd = nbytes(x, q[:, :, 0], k, tokens, index)  # only the CLS query is needed
    bwd = nbytes(tokens, index, x)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


TOKEN_SCALE = APVIT_HEAD_DIM**-0.5
TOKEN_POOL = OpSpec(
    name="token_pool",
    family="APViT",
    batches=(1, 32, 256),
    target_batch=32,
    describe=lambda b: f"B={b} {APVIT_TOKENS}->{APVIT_TOKEN_KEEP}+1 tok {APVIT_HEADS}x{APVIT_HEAD_DIM}",
    make_inputs=_token_inputs,
    grad_names=("x",),
    eager=lambda i: official.token_pool(i["x"], i["q"], i["k"], APVIT_TOKEN_KEEP, TOKEN_SCALE),
    reference=lambda x, q, k: reference.token_pool(x, q, k, APVIT_TOKEN_KEEP, TOKEN_SCALE),
    kernel=lambda i, backend: apkernels.token_pool(
        i["x"], i["q"], i["k"], APVIT_TOKEN_KEEP, scale=TOKEN_SCALE, backend=backend
    ),
    traffic=_token_traffic,
)


# ----------------------------------------------------------------------------- dan_spatial_pool
def _spatial_inputs(batch, dtype, device, generator):
    x = _randn(generator, batch, DAN_CHANNELS, DAN_GRID, DAN_GRID, dtype=dtype, device=device)
    z = _randn(generator, batch, DAN_HEADS, DAN_CHANNELS, DAN_GRID, DAN_GRID, dtype=dtype, device=device)
    return {"x": x, "z": z}


def _spatial_traffic(inp, out, pass_):
    x, z, g = inp["x"], inp["z"], out[0]
    fwd = nbytes(x, z, g)
    bwd = nbytes(g, x, z) + nbytes(x, z)  # read grad_g, x, z; write grad_x, grad_z
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


DAN_SPATIAL_POOL = OpSpec(
    name="dan_spatial_pool",
    family="DAN",
    batches=(1, 64, 256),
    target_batch=64,
    describe=lambda b: f"B={b} {DAN_CHANNELS}x{DAN_GRID}x{DAN_GRID} M={DAN_HEADS}",
    make_inputs=_spatial_inputs,
    grad_names=("x", "z"),
    eager=lambda i: official.dan_spatial_pool(i["x"], i["z"]),
    reference=reference.dan_spatial_pool,
    kernel=lambda i, backend: apkernels.dan_spatial_pool(i["x"], i["z"], backend=backend),
    traffic=_spatial_traffic,
)


# ------------------------------------------------------------------------------ dan_head_fusion
def _fusion_inputs(batch, dtype, device, generator):
    g = _randn(generator, batch, DAN_HEADS, DAN_CHANNELS, dtype=dtype, device=device)
    gate = _randn(generator, batch, DAN_HEADS, DAN_CHANNELS, dtype=dtype, device=device)
    return {"g": g, "gate_logits": gate}


def _fusion_traffic(inp, out, pass_):
    g, gate = inp["g"], inp["gate_logits"]
    fused, heads = out[0], out[1]
    fwd = nbytes(g, gate, fused, heads)
    bwd = nbytes(fused, heads, g, gate, heads) + nbytes(g, gate)  # 5 inputs, 2 outputs
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


DAN_HEAD_FUSION = OpSpec(
    name="dan_head_fusion",
    family="DAN",
    batches=(1, 64, 256),
    target_batch=64,
    describe=lambda b: f"B={b} M={DAN_HEADS} C={DAN_CHANNELS}",
    make_inputs=_fusion_inputs,
    grad_names=("g", "gate_logits"),
    eager=lambda i: official.dan_head_fusion(i["g"], i["gate_logits"]),
    reference=reference.dan_head_fusion,
    kernel=lambda i, backend: apkernels.dan_head_fusion(i["g"], i["gate_logits"], backend=backend),
    traffic=_fusion_traffic,
)

OPS = {spec.name: spec for spec in (PATCH_POOL, TOKEN_POOL, DAN_SPATIAL_POOL, DAN_HEAD_FUSION)}

# The CPU targets: fused CPU kernel >= 2x the eager official formulation at the target batch.
CPU_TARGETS = (
    ("patch_pool", "fwd"),
    ("patch_pool", "fwd+bwd"),
    ("token_pool", "fwd"),
    ("dan_spatial_pool", "fwd"),
    ("dan_spatial_pool", "fwd+bwd"),
    ("dan_head_fusion", "fwd"),
)
CPU_TARGET_SPEEDUP = 2.0


# ------------------------------------------------------------------------------------ providers
def provider_unavailable(op: str, provider: str, device) -> str | None:
    """None when `provider` can run `op` on `device` here, else the reason it is skipped."""
    device = torch.device(device)
    if provider in BASELINES:
        return None
    if provider == "triton" and device.type == "cpu":
        return "Triton on CPU tensors is the interpreter, not a benchmark"
    if provider in KERNEL_PROVIDERS:
        return _backend._unavailable_reason(op, provider, device)
    return f"unknown provider {provider!r}"


_COMPILED: dict = {}


def compiled_reference(spec: OpSpec, backend: str = "inductor"):
    """torch.compile(fullgraph=True) of the reference formulation, one wrapper per (op, backend);
    dynamo specialises on shapes and dtypes. backend="eager" only captures the graph (seconds
    instead of the 10-90 s an Inductor compile takes on a small CPU): the smoke tests use it."""
    key = (spec.name, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(spec.reference, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def provider_fn(spec: OpSpec, provider: str, compile_backend: str = "inductor") -> Callable:
    """inputs dict -> outputs for `provider`."""
    if provider == "eager":
        return spec.eager
    if provider == "compile":
        fn = compiled_reference(spec, compile_backend)
        return lambda inputs: fn(*inputs.values())
    return lambda inputs: spec.kernel(inputs, provider)


def pass_fn(spec: OpSpec, provider: str, inputs: dict, pass_: str, grads=None, compile_backend="inductor"):
    """A no-argument callable running one `pass_` of `provider`, and the outputs of one forward.

    `grads` (one tensor per float output) are the incoming gradients; made once and shared by the
    providers of a case so every provider does the same work."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    fn = provider_fn(spec, provider, compile_backend)
    leaves = {k: v.detach().requires_grad_(k in spec.grad_names) for k, v in inputs.items()}
    if "q" in leaves:  # q, k stay views of one qkv tensor (their strides matter)
        leaves["q"], leaves["k"] = inputs["q"], inputs["k"]
    wrt = [leaves[k] for k in spec.grad_names]
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                return fn(leaves)

        return run, run()
    outputs = fn(leaves)
    outs = float_outputs(outputs)
    if grads is None:
        grads = [torch.ones_like(o) for o in outs]
    if pass_ == "bwd":
        return (lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True)), outputs
    return (lambda: torch.autograd.grad(float_outputs(fn(leaves)), wrt, grads)), outputs


def make_grads(spec: OpSpec, inputs: dict, generator) -> list:
    outs = float_outputs(spec.eager({k: v.detach() for k, v in inputs.items()}))
    return [_randn(generator, *o.shape, dtype=o.dtype, device=o.device) for o in outs]


# ---------------------------------------------------------------------------------------- timing
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


# ------------------------------------------------------------------------- checks (smoke tests)
CHECK_TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (3e-2, 3e-2), torch.float16: (3e-3, 3e-3)}


def expected_result(spec: OpSpec, inputs: dict, pass_: str, grads):
    """What one call of a pass returns, computed with apkernels.reference: the forward outputs
    ("fwd") or the gradients of the inputs in `spec.grad_names` ("bwd", "fwd+bwd")."""
    _, outputs = pass_fn(spec, "reference", inputs, "fwd")
    if pass_ == "fwd":
        return outputs
    run, _ = pass_fn(spec, "reference", inputs, "fwd+bwd", grads)
    return run()


def assert_matches(spec: OpSpec, provider: str, dtype, result, expected) -> None:
    """A provider's result equals the reference's: kept indices exactly, values within the dtype's
    tolerance. The official formulation scores in the input dtype (the reference in fp32), so its
    selection may legitimately differ below fp32: there only shapes are compared."""
    result = result if isinstance(result, (tuple, list)) else (result,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(result) == len(expected), f"{provider}: {len(result)} results, expected {len(expected)}"
    loose = provider == "eager" and dtype not in (torch.float32, torch.float64)
    atol, rtol = CHECK_TOL[dtype]
    for i, (got, want) in enumerate(zip(result, expected)):
        assert got.shape == want.shape, f"{provider} result {i}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if loose:
            continue
        if not got.is_floating_point():
            assert torch.equal(got.cpu(), want.cpu()), f"{provider} result {i}: kept indices differ from the reference"
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{provider} result {i}: {m}")
