"""What is benchmarked, shared by the pytest-benchmark suites and `python -m benchmarks` (timing in
`benchmarks.timing`, the result checks in `benchmarks.checks`).

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
from typing import Callable

import torch

import apkernels
from apkernels import _backend, reference

from . import official

PASSES = ("fwd", "bwd", "fwd+bwd")
BASELINES = ("eager", "compile")
KERNEL_PROVIDERS = ("cuda", "triton", "cpu", "reference")
PROVIDERS = BASELINES + KERNEL_PROVIDERS

# Shapes of the papers' RAF-DB configurations.
APVIT_CHANNELS, APVIT_GRID, APVIT_KEEP = 768, 14, 160
APVIT_TOKENS, APVIT_HEADS, APVIT_HEAD_DIM, APVIT_TOKEN_KEEP = 161, 8, 96, 144
DAN_CHANNELS, DAN_GRID, DAN_HEADS = 512, 7, 4

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# torch.compile specialises on every shape and dtype: one process compiles many variants. Raised
# only around the benchmarks' own compiled calls, not for whoever imports this module.
RECOMPILE_LIMIT = 256


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
    # The public function returns g alone (a tensor: out[0] would be its first image's rows).
    x, z, g = inp["x"], inp["z"], out[0] if isinstance(out, (tuple, list)) else out
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
    reference=lambda x, z: reference.dan_spatial_pool(x, z)[0],  # g (the op also returns the maps s)
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

_SPECS = {spec.name: spec for spec in (PATCH_POOL, TOKEN_POOL, DAN_SPATIAL_POOL, DAN_HEAD_FUSION)}
# One spec per public op of the op registry, in its order (a new op without a spec fails here).
OPS = {name: _SPECS[name] for name in apkernels.OPS}

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
        compiled = torch.compile(spec.reference, backend=backend, fullgraph=True, dynamic=False)

        def run(*args, _compiled=compiled):
            with torch._dynamo.config.patch(_recompile_limits()):
                return _compiled(*args)

        _COMPILED[key] = run
    return _COMPILED[key]


def _recompile_limits() -> dict:
    """The dynamo recompile limits (named differently across torch versions) raised to RECOMPILE_LIMIT."""
    config = torch._dynamo.config
    return {
        name: max(getattr(config, name), RECOMPILE_LIMIT)
        for name in ("recompile_limit", "cache_size_limit")
        if hasattr(config, name)
    }


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
