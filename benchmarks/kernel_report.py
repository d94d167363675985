"""Static report of every CUDA and Triton kernel for sm_90 (H100/H200), made without a GPU.

    python -m benchmarks.kernel_report [--json PATH] [--markdown PATH] [--quick] [--backend B] [--csrc DIR]

For each fused op, backend ("cuda" / "triton"), pass ("fwd" / "fwd+bwd"), dtype and batch it prints
the kernels one op call launches at the papers' shapes with, per kernel: registers and spills
(ptxas for sm_90), shared memory per CTA (static + dynamic), resident CTAs and warps per SM
(occupancy from registers, shared memory and threads on sm_90), grid and waves over 132 SMs; and
per op: launches per call, minimal bytes (every input read once, every output written once) and
global bytes moved.

Where the numbers come from:
- CUDA: every `csrc/ops/cuda/*.cu` is compiled for sm_90 with nvcc `-Xptxas -v` (cached by source
  hash under `build/kernel_report/`). The kernels each op call launches, with their grid, block and
  dynamic shared memory, are `cuda_plan` below: the host code of the .cu files written out (no GPU
  runs it here).
- Triton: the op's launcher runs on CPU tensors with every `JITFunction.run` intercepted, so each
  launch's grid, arguments, constexprs and `num_warps` are the launcher's own; each launch is then
  specialised the way Triton's JIT does (its own binder, for `GPUTarget("cuda", 90, 32)`), compiled
  to PTX and run through ptxas -v. Nothing executes.
- global_bytes: measured, never estimated. `--emulated-counters` runs each CUDA row's op call on the
  CUDA emulation build and takes launches and global bytes from `apkernels._emulation.counters()`
  (the real kernel code): batches up to 3 exactly, larger ones extrapolated from B = 1, 2, 3
  (EMULATED_BATCHES; each row's `global_bytes_source` says which). Without nvcc it prints that
  traffic table alone. Without the flag, and for Triton (no load/store accounting yet),
  global_bytes is None ("n/a").
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "build" / "kernel_report"

# sm_90 (H100 / H200 SXM) per-SM limits.
SMS = 132
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
SM_THREADS = 2048
SM_CTAS = 32
CTA_RESERVED_SHARED_BYTES = 1024  # the runtime reserves 1 KB of shared memory per CTA
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256
SHARED_ALLOCATION_UNIT = 128

DTYPES = ("fp32", "bf16")
PASSES = ("fwd", "fwd+bwd")
BACKENDS = ("cuda", "triton")
OPS = ("patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion")


# ---------------------------------------------------------------------------------- occupancy
@dataclasses.dataclass
class Occupancy:
    ctas_per_sm: int
    warps_per_sm: int
    limiter: str


def occupancy(registers: int, shared_bytes: int, threads: int) -> Occupancy:
    """Resident CTAs and warps per SM on sm_90 for a kernel of `registers` per thread,
    `shared_bytes` (static + dynamic) per CTA and `threads` per CTA."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (SM_REGISTERS // regs_per_warp) // warps
    shared = math.ceil((shared_bytes + CTA_RESERVED_SHARED_BYTES) / SHARED_ALLOCATION_UNIT) * SHARED_ALLOCATION_UNIT
    by_shared = SM_SHARED_BYTES // shared
    by_threads = SM_THREADS // (warps * 32)
    limits = {"registers": by_registers, "shared memory": by_shared, "threads": by_threads, "CTA slots": SM_CTAS}
    limiter = min(limits, key=limits.get)
    ctas = limits[limiter]
    return Occupancy(ctas, ctas * warps, limiter)


# ---------------------------------------------------------------------------------- ptxas output
@dataclasses.dataclass
class Resources:
    registers: int
    spill_bytes: int  # spill stores + spill loads per thread
    stack_bytes: int
    static_shared_bytes: int


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict:
    """{mangled kernel name: Resources} from `ptxas -v` output."""
    out, name, props = {}, None, (0, 0, 0)
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            name, props = m.group(1), (0, 0, 0)
        elif (m := _PROPS.search(line)) and name:
            props = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and name:
            out[name] = Resources(int(m.group(1)), props[1] + props[2], props[0], int(m.group(2) or 0))
            name = None
    return out


def demangle(names) -> dict:
    names = list(names)
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, done.stdout.splitlines())) if done.returncode == 0 else {n: n for n in names}


# ---------------------------------------------------------------------------------- CUDA side
def find_nvcc():
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(Path("/usr/local").glob("cuda-*"))):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvcc_command(nvcc: str, source: Path, output: Path, csrc: Path) -> list:
    import torch.utils.cpp_extension as ext

    includes = [str(csrc), *ext.include_paths(device_type="cuda"), sysconfig.get_paths()["include"]]
    try:  # the CUDA headers of the pip-installed CUDA runtime, as setup.py adds them
        import nvidia  # noqa: F401

        for base in map(Path, nvidia.__path__):
            includes += [str(p) for p in base.glob("*/include")]
    except ImportError:
        pass
    flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-DNDEBUG", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-Xcompiler", "-fPIC"]
    return [nvcc, *flags, "-gencode=arch=compute_90,code=sm_90", "-c", "-Xptxas", "-v",
            *[f"-I{p}" for p in includes], str(source), "-o", str(output)]


def _source_hash(source: Path, csrc: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(csrc.rglob("*")):
        if path.suffix in (".h", ".cuh") or path == source:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cuda_resources(progress=print, csrc: Path = ROOT / "csrc") -> dict:
    """{demangled kernel name: Resources} of every kernel in csrc/ops/cuda (of the `csrc` tree),
    compiled for sm_90."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME): the CUDA kernels cannot be compiled for sm_90")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    resources = {}
    for source in sorted((csrc / "ops" / "cuda").glob("*.cu")):
        log_path = CACHE_DIR / f"{source.stem}-{_source_hash(source, csrc)}.ptxas.log"
        if not log_path.exists():
            progress(f"compiling {source} for sm_90 (about a minute) ...")
            with tempfile.TemporaryDirectory() as tmp:
                done = subprocess.run(_nvcc_command(nvcc, source, Path(tmp) / "out.o", csrc), capture_output=True,
                                      text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
            log_path.write_text(done.stdout + done.stderr)
        resources.update(parse_ptxas(log_path.read_text()))
    names = demangle(resources)
    return {names[k]: v for k, v in resources.items()}


@dataclasses.dataclass
class Launch:
    kernel: str  # CUDA: a regex on the demangled name; Triton: the kernel's name
    grid: tuple
    threads: int
    dynamic_shared_bytes: int = 0


CUDA_TYPES = {"fp32": "float", "bf16": "c10::BFloat16"}
PACK = {"fp32": 4, "bf16": 8}  # elements per 16-byte pack


def _elementwise_blocks(n: int) -> int:
    return max(1, min(math.ceil(n / 256), SMS * 32))


def cuda_plan(op: str, pass_: str, dtype: str, shapes: dict) -> list:
    """The launches of one call of the CUDA op (and its backward), as the host code in
    csrc/ops/cuda decides them for contiguous paper-shaped inputs: [Launch]."""
    t = re.escape(CUDA_TYPES[dtype])
    B = shapes["batch"]
    plans = []
    if op == "patch_pool":
        N, C = shapes["N"], shapes["C"]
        # NCHW input: the transpose tiles (16 warps x 16 x 34 floats) outgrow the 8 N key bytes.
        # (Older sources took the score kind at run time: no kind in the name.)
        plans.append(Launch(rf"patch_pool_kernel<{t}(, \(apkernels::ScoreKind\)0(, true)?)?>", (B,), 512,
                            max(8 * N, 16 * 16 * 34 * 4)))
        if pass_ == "fwd+bwd":
            plans += _pool_backward_plan(dtype, B, N, C, reduce_batch=True)
    elif op == "token_pool":
        N, C = shapes["N"], shapes["C"]
        # A persistent grid of up to 2 CTAs per SM; q's CLS row (heads x head_dim fp32, 16-byte
        # rounded) before the keys in dynamic shared memory. (Older sources: grid B, keys only.)
        q_row = -(-shapes["heads"] * shapes["head_dim"] * 4 // 16) * 16
        plans.append(Launch(rf"token_pool_kernel<{t}, {t}(, \(apkernels::ScoreKind\)1(, true)?)?>", (min(B, 2 * SMS),),
                            512, q_row + 8 * (N - 1)))
        if pass_ == "fwd+bwd":
            plans += _pool_backward_plan(dtype, B, N, C, reduce_batch=False)
    elif op == "dan_spatial_pool":
        M, C, C2, P = shapes["M"], shapes["C"], shapes["C2"], shapes["P"]
        reduce_s = Launch(rf"channel_reduce_kernel<true, {t}, float>", (B * M * math.ceil(P / 32),), 256)
        plans.append(reduce_s)
        plans.append(Launch(rf"pool_kernel<{t}, float>", (math.ceil(B * C / 8),), 256))
        if pass_ == "fwd+bwd":
            plans.append(reduce_s)
            plans.append(Launch(rf"channel_reduce_kernel<false, {t}, float>", (B * M * math.ceil(P / 32),), 256))
            # (index type uint32 at these sizes; older sources had none)
            plans.append(Launch(rf"grad_x_kernel<{t}, float(, unsigned int)?>", (_elementwise_blocks(B * C * P),), 256))
            plans.append(Launch(rf"grad_z_kernel<{t}, float(, unsigned int)?>", (_elementwise_blocks(B * M * C2 * P),), 256))
    elif op == "dan_head_fusion":
        C = shapes["C"]
        plans.append(Launch(rf"head_fusion_kernel<{t}, float>", (_elementwise_blocks(B * C),), 256))
        if pass_ == "fwd+bwd":
            plans.append(Launch(rf"head_fusion_backward_kernel<{t}, float>", (_elementwise_blocks(B * C),), 256))
    return plans


def _pool_backward_plan(dtype, B, N, C, reduce_batch):
    t = re.escape(CUDA_TYPES[dtype])
    units = N * (C // PACK[dtype] if C % PACK[dtype] == 0 else C)
    grid = (math.ceil(units / 256),) if reduce_batch else (math.ceil(units / 256), min(B, 65535))
    return [Launch(r"inverse_index_kernel", (B,), 256), Launch(rf"scatter_rows_kernel<{t}>", grid, 256)]


# Batches the emulator runs for the CUDA traffic. Every CUDA launch's grid is per image (patch_pool,
# token_pool, inverse_index: one CTA per image; channel_reduce: one per (image, head, tile);
# scatter_rows: a batch dimension, or a loop over the batch for the position gradient) or a
# grid-stride loop over elements that are B x (per-image size): the bytes a call moves are
# fixed + per_image * B (fixed: the position gradient written once). The emulator measures B = 1, 2, 3,
# checks that the three are affine in B and extrapolates; batches up to 3 are measured exactly.
# Affine up to AFFINE_TOLERANCE (relative, per-image bytes): a few loads depend on the data (DAN's
# grad_z reads t only where z > 0), so the per-image bytes of random inputs vary by a few bytes.
EMULATED_BATCHES = (1, 2, 3)
AFFINE_TOLERANCE = 1e-3


@functools.lru_cache(maxsize=None)
def _emulated_call(op: str, pass_: str, dtype: str, batch: int):
    """(launches, global bytes read + written) of one call of the CUDA op (and its backward op) run by
    the CUDA emulation build on CPU tensors at `batch`, or None without that build."""
    try:
        from apkernels import _emulation
    except ImportError:
        return None
    if not _emulation.available(op):
        return None
    _emulation.reset_counters()
    _run_op(op, pass_, dtype, batch, _emulation.SUFFIX)
    launches = list(_emulation.counters())
    return len(launches), sum(launch["global_read_bytes"] + launch["global_write_bytes"] for launch in launches)


def emulated_counters(op: str, pass_: str, dtype: str, batch: int):
    """Launches and global bytes (read + written) of one call of the CUDA op (and its backward op),
    measured on the CUDA emulation build (the real kernel code, every access counted), or None
    without that build: {"launches", "global_bytes", "global_bytes_source"}.

    Batches up to max(EMULATED_BATCHES) run exactly; larger ones are extrapolated from them (the
    emulator runs every CUDA thread as a fiber: about 0.2 s per image and op here), after checking
    that launches are the same and bytes affine in the batch (RuntimeError otherwise)."""
    if batch <= max(EMULATED_BATCHES):
        measured = _emulated_call(op, pass_, dtype, batch)
        if measured is None:
            return None
        return {"launches": measured[0], "global_bytes": measured[1], "global_bytes_source": f"emulated at B={batch}"}
    measured = [_emulated_call(op, pass_, dtype, b) for b in EMULATED_BATCHES]
    if measured[0] is None:
        return None
    launches = {m[0] for m in measured}
    steps = [(m1[1] - m0[1]) / (b1 - b0) for (b0, m0), (b1, m1) in zip(zip(EMULATED_BATCHES, measured),
                                                                       zip(EMULATED_BATCHES[1:], measured[1:]))]
    if len(launches) != 1 or max(steps) - min(steps) > AFFINE_TOLERANCE * max(steps):
        raise RuntimeError(f"{op} {pass_} {dtype}: emulated (launches, bytes) at B={EMULATED_BATCHES} are "
                           f"{measured}, not affine in the batch: cannot extrapolate to B={batch}")
    per_image = (measured[-1][1] - measured[0][1]) / (EMULATED_BATCHES[-1] - EMULATED_BATCHES[0])
    global_bytes = round(measured[0][1] + (batch - EMULATED_BATCHES[0]) * per_image)
    batches = ",".join(map(str, EMULATED_BATCHES))
    return {"launches": launches.pop(), "global_bytes": global_bytes,
            "global_bytes_source": f"emulated at B={batches}, extrapolated (affine in B)"}


# ---------------------------------------------------------------------------------- Triton side
# Aten ops that move data, recorded around the Triton launchers: (op, pass, dtype, batch) -> [name].
recorded_aten = {}
_NO_DATA_MOVEMENT = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "as_strided",
                     "expand", "permute", "select", "slice", "unsqueeze", "squeeze", "reshape", "_reshape_alias",
                     "t", "transpose", "detach", "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
                     "is_same_size", "_to_copy_meta", "min", "max", "aminmax", "item", "_local_scalar_dense",
                     "lt", "ge", "any", "all", "eq", "ne", "gt", "le", "logical_or", "bitwise_or", "__or__")


def _aten_name(func) -> str:
    return func.__name__.split(".")[0]


class _AtenWork:
    """Records the aten ops a launcher runs besides its Triton kernels that touch tensor data
    (fills, copies, dtype conversions), with the torch profiler (nested ops included); index
    checks (min/max) and allocations are left out. Only while `active` (inside the op calls)."""

    def __enter__(self):
        self.ops, self.active, self._windows = [], False, []
        return self

    def __exit__(self, *exc):
        return False

    def call(self, fn, *args):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(*args)
        for event in prof.events():
            name = event.name
            if name.startswith("aten::") and name[6:] not in _NO_DATA_MOVEMENT and not _inside_aten(event):
                self.ops.append(name[6:])
        return out


def _inside_aten(event) -> bool:
    """True for an aten op called by another aten op (e.g. the fill_ inside zeros): count the outer one."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def triton_launches(op: str, pass_: str, dtype: str, batch: int) -> list:
    """[(JITFunction, grid, args, kwargs)] of one call of the Triton op (and its backward), recorded
    from the launcher without running anything."""
    import torch
    from triton.runtime.jit import JITFunction

    from apkernels.triton_kernels import _common

    recorded = []

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((self, grid, args, kwargs))

    saved = JITFunction.run, getattr(_common, "check_launch", None)
    JITFunction.run = record
    if saved[1] is not None:
        _common.check_launch = lambda *a, **k: None  # CPU tensors stand in for CUDA ones
    try:
        with torch.no_grad(), _AtenWork() as aten:
            _run_op(op, pass_, dtype, batch, "_triton", inputs_outside=aten)
        recorded_aten[(op, pass_, dtype, batch)] = aten.ops
    finally:
        JITFunction.run = saved[0]
        if saved[1] is not None:
            _common.check_launch = saved[1]
    return recorded


def _run_op(op, pass_, dtype, batch, suffix, inputs_outside=None):
    """One call of torch.ops.apkernels.<op><suffix> (and its backward op) on paper-shaped inputs.
    `inputs_outside` (an _AtenWork) records the aten ops of the op calls (not of building inputs)."""
    import torch

    from benchmarks import specs as common

    spec = common.OPS[op]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    inputs = spec.make_inputs(batch, torch_dtype, "cpu", torch.Generator().manual_seed(0))
    ops = torch.ops.apkernels

    def fn(name):
        op_fn = getattr(ops, name + suffix)
        return op_fn if inputs_outside is None else lambda *args: inputs_outside.call(op_fn, *args)
    if op == "patch_pool":
        x = inputs["x"]
        tokens, index = fn("patch_pool")(x, common.APVIT_KEEP, inputs["pos"], "sum_abs")
        if pass_ == "fwd+bwd":  # the forward did not run: valid kept positions stand in for its index
            fn("pool_backward")(torch.empty_like(tokens), _kept(index), x.shape[2] * x.shape[3], True)
    elif op == "token_pool":
        x = inputs["x"]
        tokens, index = fn("token_pool")(x, inputs["q"], inputs["k"], common.APVIT_TOKEN_KEEP, common.TOKEN_SCALE,
                                         "sum")
        if pass_ == "fwd+bwd":
            fn("pool_backward")(torch.empty_like(tokens), _kept(index), x.shape[1], False)
    elif op == "dan_spatial_pool":
        g = fn("dan_spatial_pool")(inputs["x"], inputs["z"])
        if pass_ == "fwd+bwd":
            fn("dan_spatial_pool_backward")(torch.empty_like(g), inputs["x"], inputs["z"])
    elif op == "dan_head_fusion":
        fused, heads = fn("dan_head_fusion")(inputs["g"], inputs["gate_logits"])
        if pass_ == "fwd+bwd":
            fn("dan_head_fusion_backward")(torch.empty_like(fused), torch.empty_like(heads), inputs["g"],
                                           inputs["gate_logits"], heads)
    return inputs


def _kept(index):
    """Ascending positions 0..K-1 per image, in the shape of `index`."""
    import torch

    return torch.arange(index.shape[1]).expand(index.shape).contiguous()


def triton_compile(jit_fn, args, kwargs, cache: dict) -> tuple:
    """(Resources, shared bytes, num_warps) of one recorded launch, compiled for sm_90 with the
    specialisation Triton's JIT would choose for these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (jit_fn.__name__, repr(signature), repr(sorted(constexprs.items(), key=repr)), repr(attrs),
           repr(sorted(vars(options).items())))
    if key not in cache:
        source = triton.compiler.ASTSource(jit_fn, signature, constexprs, attrs)
        compiled = triton.compile(source, target=target, options=vars(options))
        cache[key] = (_ptxas_resources(compiled.asm["ptx"]), compiled.metadata.shared, compiled.metadata.num_warps)
    return cache[key]


def _ptxas_resources(ptx: str) -> Resources:
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        done = subprocess.run([ptxas, f"-arch={arch}", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    parsed = parse_ptxas(done.stdout + done.stderr)
    return next(iter(parsed.values()))


# ---------------------------------------------------------------------------------- rows
def op_shapes(op: str, batch: int) -> dict:
    from benchmarks import specs as c

    if op == "patch_pool":
        return dict(batch=batch, N=c.APVIT_GRID * c.APVIT_GRID, C=c.APVIT_CHANNELS)
    if op == "token_pool":
        return dict(batch=batch, N=c.APVIT_TOKENS, C=c.APVIT_CHANNELS, heads=c.APVIT_HEADS, head_dim=c.APVIT_HEAD_DIM)
    if op == "dan_spatial_pool":
        return dict(batch=batch, M=c.DAN_HEADS, C=c.DAN_CHANNELS, C2=c.DAN_CHANNELS, P=c.DAN_GRID * c.DAN_GRID)
    return dict(batch=batch, M=c.DAN_HEADS, C=c.DAN_CHANNELS)


def minimal_bytes(op: str, pass_: str, dtype: str, batch: int) -> int:
    """Every input read once, every output written once (benchmarks.common's traffic model)."""
    import torch

    from benchmarks import specs as common

    spec = common.OPS[op]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    inputs = _meta_inputs(spec, batch, torch_dtype)
    with torch.device("meta"):
        outputs = _meta_outputs(op, inputs)
    return int(spec.traffic(inputs, outputs, pass_))


def _meta_inputs(spec, batch, dtype):
    import torch

    # make_inputs draws random numbers on the CPU; shapes only are needed: build at batch 1 and
    # widen the batch dimension (every op's inputs lead with the batch, pos excepted).
    small = spec.make_inputs(1, dtype, "cpu", torch.Generator().manual_seed(0))
    out = {}
    for name, t in small.items():
        shape = list(t.shape)
        if name != "pos":
            shape[0] = batch
        out[name] = torch.empty(shape, dtype=t.dtype, device="meta")
    return out


def _meta_outputs(op, i):
    import torch

    from benchmarks import specs as c

    B = next(iter(i.values())).shape[0]
    if op == "patch_pool":
        C = i["x"].shape[1]
        return (torch.empty(B, c.APVIT_KEEP, C, dtype=i["x"].dtype), torch.empty(B, c.APVIT_KEEP, dtype=torch.long))
    if op == "token_pool":
        C = i["x"].shape[2]
        k = c.APVIT_TOKEN_KEEP + 1
        return (torch.empty(B, k, C, dtype=i["x"].dtype), torch.empty(B, k, dtype=torch.long))
    if op == "dan_spatial_pool":
        return torch.empty(B, i["z"].shape[1], i["x"].shape[1], dtype=i["x"].dtype)
    g = i["g"]
    return (torch.empty(B, g.shape[2], dtype=g.dtype), torch.empty_like(g))


def kernel_entry(name, resources, grid, threads, dynamic_shared):
    ctas = math.prod(grid)
    shared = resources.static_shared_bytes + dynamic_shared
    occ = occupancy(resources.registers, shared, threads)
    return {
        "kernel": name,
        "registers": resources.registers,
        "spills": resources.spill_bytes,
        "shared_bytes": shared,
        "threads": threads,
        "ctas_per_sm": occ.ctas_per_sm,
        "warps_per_sm": occ.warps_per_sm,
        "occupancy_limiter": occ.limiter,
        "grid": list(grid),
        "waves": round(ctas / (occ.ctas_per_sm * SMS), 3) if occ.ctas_per_sm else None,
    }


def cuda_rows(resources: dict, batches, dtypes, emulate: bool = False, ops=OPS) -> list:
    rows = []
    for op in ops:
        for pass_ in PASSES:
            for dtype in dtypes:
                for batch in batches:
                    kernels = []
                    for launch in cuda_plan(op, pass_, dtype, op_shapes(op, batch)):
                        matches = [n for n in resources if re.search(launch.kernel, n)]
                        if not matches:
                            raise RuntimeError(f"no compiled kernel matches {launch.kernel!r} (op {op})")
                        name = min(matches, key=len)
                        kernels.append(kernel_entry(_short(name), resources[name], launch.grid, launch.threads,
                                                    launch.dynamic_shared_bytes))
                    counters = emulated_counters(op, pass_, dtype, batch) if emulate else None
                    rows.append(make_row(op, "cuda", pass_, dtype, batch, kernels, counters=counters))
    return rows


def emulated_traffic_rows(batches, dtypes, ops=OPS) -> list:
    """CUDA rows with the emulator's launches and global bytes only (no nvcc: no kernel resources)."""
    return [make_row(op, "cuda", pass_, dtype, batch, [], counters=emulated_counters(op, pass_, dtype, batch))
            for op in ops for pass_ in PASSES for dtype in dtypes for batch in batches]


def triton_rows(batches, dtypes, ops=OPS) -> list:
    rows, cache = [], {}
    for op in ops:
        for pass_ in PASSES:
            for dtype in dtypes:
                for batch in batches:
                    kernels = []
                    for jit_fn, grid, args, kwargs in triton_launches(op, pass_, dtype, batch):
                        grid = tuple(grid) if not callable(grid) else tuple(grid(kwargs))
                        res, shared, warps = triton_compile(jit_fn, args, kwargs, cache)
                        kernels.append(kernel_entry(jit_fn.__name__, res, grid, warps * 32, shared))
                    row = make_row(op, "triton", pass_, dtype, batch, kernels, counters=None)
                    row["host_aten_ops"] = recorded_aten.get((op, pass_, dtype, batch), [])
                    rows.append(row)
    return rows


def make_row(op, backend, pass_, dtype, batch, kernels, counters):
    from benchmarks import specs as common

    return {
        "op": op,
        "backend": backend,
        "pass": pass_,
        "dtype": dtype,
        "batch": batch,
        "paper_scale": batch == max(common.OPS[op].batches),
        "global_bytes": counters["global_bytes"] if counters else None,
        "global_bytes_source": counters["global_bytes_source"] if counters else None,
        "minimal_bytes": minimal_bytes(op, pass_, dtype, batch),
        "launches": counters["launches"] if counters else len(kernels),
        "max_registers": max((k["registers"] for k in kernels), default=None),
        "spills": sum(k["spills"] for k in kernels) if kernels else None,
        "min_warps_per_sm": min((k["warps_per_sm"] for k in kernels), default=None),
        "kernels": kernels,
    }


def _short(name: str) -> str:
    """A demangled name without namespaces and parameter list."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = name.replace("apkernels::cuda::", "").replace("apkernels::", "")
    depth, out = 0, []
    for ch in name:  # drop the trailing parameter list
        if ch == "(" and depth == 0 and out and out[-1] not in ", <":
            break
        depth += ch == "<"
        depth -= ch == ">"
        out.append(ch)
    return "".join(out)


# ---------------------------------------------------------------------------------- output
def traffic_ratio(row):
    """Global bytes moved / minimal bytes of a row, or None where not measured."""
    return None if row["global_bytes"] is None else row["global_bytes"] / row["minimal_bytes"]


def format_traffic_table(rows) -> str:
    """Global bytes moved / minimal bytes per row (the emulated CUDA kernels)."""
    lines = ["| op | backend | pass | dtype | B | launches | global bytes | minimal bytes | global / minimal | measured |",
             "|" + "---|" * 10]
    for r in rows:
        ratio = traffic_ratio(r)
        lines.append("| " + " | ".join([
            r["op"], r["backend"], r["pass"], r["dtype"], str(r["batch"]), str(r["launches"]),
            "n/a" if r["global_bytes"] is None else f"{r['global_bytes'] / 1e6:.2f} MB",
            f"{r['minimal_bytes'] / 1e6:.2f} MB", "n/a" if ratio is None else f"{ratio:.2f}",
            r.get("global_bytes_source") or "not measured"]) + " |")
    return "\n".join(lines)


def format_table(rows) -> str:
    lines = ["| op | backend | pass | dtype | B | launches | kernel | regs | spills | smem/CTA | CTAs/SM | "
             "warps/SM | limiter | grid | waves | global / minimal bytes |",
             "|" + "---|" * 16]
    for r in rows:
        ratio = "n/a" if r["global_bytes"] is None else f"{traffic_ratio(r):.2f}"
        launches = str(r["launches"])
        if r.get("host_aten_ops"):
            launches += " + aten " + ", ".join(r["host_aten_ops"])
        for i, k in enumerate(r["kernels"]):
            head = [r["op"], r["backend"], r["pass"], r["dtype"], str(r["batch"]), launches] if i == 0 \
                else [""] * 6
            tail = [f"{ratio} ({r['minimal_bytes'] / 1e6:.1f} MB min)" if i == 0 else ""]
            lines.append("| " + " | ".join(head + [
                f"`{k['kernel']}`", str(k["registers"]), str(k["spills"]), f"{k['shared_bytes'] / 1024:.1f} KB",
                str(k["ctas_per_sm"]), str(k["warps_per_sm"]), k["occupancy_limiter"],
                "x".join(map(str, k["grid"])), f"{k['waves']:.2f}"] + tail) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} to this file")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--emulated-counters", action="store_true",
                        help="measure the CUDA rows' launches and global bytes on the CUDA emulation build "
                             "(apkernels._emulation; slow: every CUDA thread is a fiber)")
    parser.add_argument("--quick", action="store_true", help="paper batch and bf16 only (the CI smoke run)")
    parser.add_argument("--backend", choices=BACKENDS, action="append", help="only these backends")
    parser.add_argument("--op", choices=OPS, action="append", help="only these ops")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="only these dtypes")
    parser.add_argument("--batch", type=int, action="append", help="only these batch sizes")
    parser.add_argument("--csrc", type=Path, default=ROOT / "csrc",
                        help="the C++/CUDA source tree to compile (default: this checkout's csrc; e.g. an older "
                             "commit's, exported with git archive, for a before/after comparison)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the Triton kernels are compiled, not interpreted

    from benchmarks import specs as common

    batches = (256,) if args.quick else sorted({b for spec in common.OPS.values() for b in spec.batches})
    dtypes = ("bf16",) if args.quick else DTYPES
    batches = tuple(args.batch) if args.batch else batches
    dtypes = tuple(args.dtype) if args.dtype else dtypes
    ops = tuple(args.op) if args.op else OPS
    backends = args.backend or BACKENDS
    rows = []
    if "cuda" in backends:
        if find_nvcc() is None and args.emulated_counters:
            print("kernel_report: nvcc not found: CUDA rows carry the emulator's traffic only", file=sys.stderr)
            rows += emulated_traffic_rows(batches, dtypes, ops)
        elif find_nvcc() is None:
            print("kernel_report: nvcc not found: CUDA rows skipped", file=sys.stderr)
        else:
            resources = cuda_resources(progress=lambda m: print(m, file=sys.stderr), csrc=args.csrc)
            rows += cuda_rows(resources, batches, dtypes, emulate=args.emulated_counters, ops=ops)
    if "triton" in backends:
        rows += triton_rows(batches, dtypes, ops)
    with_kernels = [r for r in rows if r["kernels"]]  # (none when only the emulator's traffic was measured)
    tables = [format_table(with_kernels)] if with_kernels else []
    measured = [r for r in rows if r["global_bytes"] is not None]
    if measured:  # global bytes moved / minimal bytes of the real kernel code, and how each was measured
        tables.append("Global bytes moved by the CUDA kernels (emulation build):\n\n" + format_traffic_table(measured))
    table = "\n\n".join(tables)
    note = ("global bytes: measured only with --emulated-counters on the CUDA emulation build (apkernels._emulation): "
            "every global load and store of the real kernel code counted (bytes read + written, all launches of the "
            f"call); batches up to {max(EMULATED_BATCHES)} exactly, larger ones extrapolated from "
            f"B={','.join(map(str, EMULATED_BATCHES))} (every grid is per image or a grid-stride loop over B x "
            "per-image elements: bytes are affine in B, checked on the three). n/a otherwise, and for Triton (no "
            "load/store accounting yet): never estimated. launches = kernels one op call launches (CUDA: the host "
            "code's plan, or the emulator's count; Triton: recorded from the launcher).")
    print(table + "\n\n" + note)
    if args.markdown:
        args.markdown.write_text(table + "\n\n" + note + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
