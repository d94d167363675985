"""Static report of every CUDA and Triton kernel for sm_90 (H100/H200), made without a GPU.

    python -m benchmarks.kernel_report [--json PATH] [--markdown PATH] [--global-bytes] [--check [--strict]]
                                       [--quick] [--backend B] [--op OP] [--dtype D] [--batch N] [--csrc DIR]

For each fused op, backend ("cuda" / "triton"), pass ("fwd" / "fwd+bwd"), dtype and batch it prints
the kernels one op call launches at the papers' shapes with, per kernel: registers and spills
(ptxas for sm_90), shared memory per CTA (static + dynamic), resident CTAs and warps per SM
(occupancy from registers, shared memory and threads on sm_90), grid and waves over 132 SMs; and
per op: launches per call, the aten ops the call runs besides its kernels, minimal bytes (every
input read once, every output written once) and global bytes moved. `--check` adds one line per
row with every target met or missed (`--strict`: exit status 1 when one is missed).

Where the numbers come from:
- CUDA: every `csrc/ops/cuda/*.cu` is compiled for sm_90 with nvcc `-Xptxas -v` (cached by source
  hash under `build/kernel_report/`). The kernels each op call launches, with their grid, block and
  dynamic shared memory, are `cuda_plan` below: the host code of the .cu files written out (no GPU
  runs it here).
- Triton: the op's launcher runs on CPU tensors with every `JITFunction.run` intercepted, so each
  launch's grid, arguments, constexprs and `num_warps` are the launcher's own; each launch is then
  specialised the way Triton's JIT does (its own binder, for `GPUTarget("cuda", 90, 32)`), compiled
  to PTX and run through ptxas -v. Nothing executes. The aten ops of the op calls are recorded with
  the torch profiler meanwhile.
- global_bytes: measured, never estimated. `--global-bytes` runs each CUDA row's op call on the
  CUDA emulation build (launches, global bytes and host aten ops from `apkernels._emulation.counters()`
  and the profiler) and each Triton row's op call in the Triton interpreter (a child process with
  TRITON_INTERPRET=1; `interpreted_global_traffic` counts every tl.load / tl.store / atomic), the
  real kernel code both: batches up to 3 exactly, larger ones extrapolated from B = 1, 2, 3
  (MEASURED_BATCHES; each row's `global_bytes_source` says which). Without nvcc the CUDA rows carry
  those measurements alone. Without the flag global_bytes is None ("n/a").
"""
import argparse
import contextlib
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
    persistent: bool = False  # a persistent grid (loops over the work): the waves target does not apply


CUDA_TYPES = {"fp32": "float", "bf16": "c10::BFloat16"}
PACK = {"fp32": 4, "bf16": 8}  # elements per 16-byte pack


def _elementwise_blocks(n: int) -> int:
    return max(1, min(math.ceil(n / 256), SMS * 32))


def cuda_plan(op: str, pass_: str, dtype: str, shapes: dict) -> list:
    """The launches of one call of the CUDA op (and its backward), as the host code in
    csrc/ops/cuda decides them for contiguous paper-shaped inputs: [Launch]."""
    from benchmarks import specs as common

    t = re.escape(CUDA_TYPES[dtype])
    B = shapes["batch"]
    plans = []
    if op == "patch_pool":
        N, C = shapes["N"], shapes["C"]
        keep = shapes["keep"]
        # sm_90: patch_pool_cluster_kernel, clusters of 8 blocks (C / 8 channels each), a persistent
        # grid of min(B, SMs / 8, 1 + B x image bytes x 4 % / pos bytes) clusters (plan_cluster);
        # dynamic shared memory: keys 8 N, kept 8 keep, partials 2 x 4 N, the x slice [C / 8][N | 1]
        # and the pos slice [N][C / 8], each 16-byte aligned (cluster_layout).
        elem = 4 if dtype == "fp32" else 2
        blocks, slice_ = 8, math.ceil(C / 8)
        round16 = lambda v: (v + 15) // 16 * 16  # noqa: E731
        x_off = round16(round16(round16(8 * N) + 8 * keep) + 8 * N)
        smem = round16(round16(x_off + elem * slice_ * (N | 1)) + elem * N * slice_)
        clusters = _patch_pool_clusters(dtype, B, N, C, keep)
        plans.append(Launch(rf"patch_pool_cluster_kernel<{t}, \(apkernels::ScoreKind\)0>", (clusters * blocks,), 512,
                            smem, persistent=True))
        if pass_ == "fwd+bwd":
            plans += _pool_backward_plan(dtype, B, common.APVIT_KEEP, N, C, reduce_batch=True)
    elif op == "token_pool":
        N, C = shapes["N"], shapes["C"]
        # A persistent grid of up to 2 CTAs per SM; q's CLS row (heads x head_dim fp32, 16-byte
        # rounded) before the keys in dynamic shared memory. (Older sources: grid B, keys only.)
        q_row = -(-shapes["heads"] * shapes["head_dim"] * 4 // 16) * 16
        plans.append(Launch(rf"token_pool_kernel<{t}, {t}(, \(apkernels::ScoreKind\)1(, true)?)?>", (min(B, 2 * SMS),),
                            512, q_row + 8 * (N - 1), persistent=True))
        if pass_ == "fwd+bwd":
            plans += _pool_backward_plan(dtype, B, common.APVIT_TOKEN_KEEP + 1, N, C, reduce_batch=False)
    elif op == "dan_spatial_pool":
        M, C, C2, P = shapes["M"], shapes["C"], shapes["C2"], shapes["P"]
        # One 512-thread CTA per image, a persistent grid (at most 4 resident per SM); dynamic shared
        # memory: s [M, P] + partial sums [R, P], R = 512 // P (backward: + t [M, P], grad_g [M, C],
        # partial [min(M, 4), R, P]), fp32.
        images = (min(B, SMS * 4),)
        R = max(1, 512 // P)
        partial = R * P if R > 1 else 0
        plans.append(Launch(rf"spatial_pool_kernel<{t}, float>", images, 512, (M * P + partial) * 4, persistent=True))
        if pass_ == "fwd+bwd":
            plans.append(Launch(rf"spatial_pool_backward_kernel<{t}, float>", images, 512,
                                (2 * M * P + M * C + min(M, 4) * partial) * 4, persistent=True))
    elif op == "dan_head_fusion":
        C = shapes["C"]
        # Grid-stride over B x C, 128-thread CTAs capped at the resident capacity (16 per SM).
        blocks = (max(1, min(math.ceil(B * C / 128), SMS * 16)),)
        plans.append(Launch(rf"head_fusion_registers_kernel<{t}, float, unsigned int>", blocks, 128, persistent=True))
        if pass_ == "fwd+bwd":
            plans.append(Launch(rf"head_fusion_backward_registers_kernel<{t}, float, unsigned int>", blocks, 128,
                                persistent=True))
    return plans


def _pool_backward_grid(dtype, B, K, N, C, reduce_batch):
    """(channels per unit, tiles, batch chunks) of pool_backward_kernel, as the host code decides
    them for a contiguous grad (csrc/ops/cuda/pool_backward_kernel.cu: kUnitChannels, batch_chunks)."""
    element_bytes = {"fp32": 4, "bf16": 2}[dtype]
    width = 4 if element_bytes == 4 else 2
    width = width if C % width == 0 else 1
    tiles = math.ceil(N * (C // width) / 256)
    target = 2 * 132 * 4 * (1 if reduce_batch else 4)
    chunks = min(B, 65535, max(1, math.ceil(target / tiles)))
    if reduce_batch:  # the workspace stays within 1/20 of the backward's minimal bytes
        chunks = max(1, min(chunks, B * (K + N) * element_bytes // (20 * 8 * N)))
    return width, tiles, math.ceil(B / math.ceil(B / chunks))


def _pool_backward_plan(dtype, B, K, N, C, reduce_batch):
    """The inverse index (one CTA per image, in shared memory up to 12288 rows), then the fused
    scatter + batch sum over (tiles of 256 units) x (batch chunks)."""
    t = re.escape(CUDA_TYPES[dtype])
    width, tiles, chunks = _pool_backward_grid(dtype, B, K, N, C, reduce_batch)
    return [Launch(r"inverse_index_kernel", (B,), 256, 4 * N if N <= 12288 else 0),
            Launch(rf"pool_backward_kernel<{t}, {width}, {str(reduce_batch).lower()}>", (tiles, chunks), 256)]


def _triton_pool_backward_grid(dtype, B, K, N, C, reduce_batch):
    """(tiles, batch chunks) of the Triton _pool_backward_kernel on a GPU (the launcher in
    apkernels/triton_kernels/pool_backward.py: one row x 128 fp32 / 64 bf16 channels per program)."""
    element_bytes = {"fp32": 4, "bf16": 2}[dtype]
    tiles = N * math.ceil(C / (128 if element_bytes == 4 else 64))
    chunks = min(B, 65535, max(1, math.ceil(2 * 132 * 32 / tiles)))
    if reduce_batch:
        chunks = max(1, min(chunks, B * (K + N) * element_bytes // (20 * 8 * N)))
    return tiles, math.ceil(B / math.ceil(B / chunks))


def _batch_sum_workspace_bytes(op: str, pass_: str, dtype: str, batch: int, backend: str = "cuda") -> int:
    """Global bytes of pool_backward's batch-sum workspace (patch_pool's backward), which are not
    per image: the chunk count stops growing with B (8 / 4 chunks fp32 / bf16 at B = 256). fp32
    partial sums [chunks, N, C] written and read once, the tile counters zeroed (4 B each) and
    counted by one atomic add per CTA / program (4 B read + 4 B written). 0 with a single chunk
    (every batch up to 3 at the paper shapes, where the bytes are measured)."""
    if op != "patch_pool" or pass_ != "fwd+bwd":
        return 0
    from benchmarks import specs as common

    shapes = op_shapes(op, batch)
    N, C = shapes["N"], shapes["C"]
    if backend == "cuda":
        _, tiles, chunks = _pool_backward_grid(dtype, batch, common.APVIT_KEEP, N, C, True)
    else:
        tiles, chunks = _triton_pool_backward_grid(dtype, batch, common.APVIT_KEEP, N, C, True)
    if chunks == 1:
        return 0
    return 2 * chunks * N * C * 4 + tiles * 4 + tiles * chunks * 8


def _patch_pool_clusters(dtype: str, B: int, N: int, C: int, keep: int) -> int:
    """Clusters of 8 CTAs in patch_pool_cluster_kernel's persistent grid on 132 SMs, as plan_cluster
    (csrc/ops/cuda/patch_pool_kernel.cu) decides: no more than images, than SMs / 8, and than keeps
    the pos re-reads (one per cluster) within 4 % of the images' bytes."""
    element_bytes = {"fp32": 4, "bf16": 2}[dtype]
    image_bytes = element_bytes * (C * N + keep * C) + 8 * keep
    return min(B, max(1, SMS // 8), 1 + int(B * image_bytes * 0.04 / (element_bytes * N * C)))


def _cluster_pos_reread_bytes(op: str, dtype: str, batch: int, backend: str = "cuda") -> int:
    """Global bytes of the CUDA patch_pool cluster kernel's pos re-reads beyond the first: each
    persistent cluster reads pos once, and the cluster count grows with B only up to a budget (host
    code: plan_cluster in csrc/ops/cuda/patch_pool_kernel.cu, on 132 SMs: 16 clusters of 8 CTAs at
    B = 256, 3 at B = 32, 1 at every batch up to 3, where the bytes are measured)."""
    if op != "patch_pool" or backend != "cuda":
        return 0
    from benchmarks import specs as common

    shapes = op_shapes(op, batch)
    N, C = shapes["N"], shapes["C"]
    pos_bytes = {"fp32": 4, "bf16": 2}[dtype] * N * C
    return (_patch_pool_clusters(dtype, batch, N, C, common.APVIT_KEEP) - 1) * pos_bytes


def _non_affine_bytes(op: str, pass_: str, dtype: str, batch: int, backend: str) -> int:
    """The modelled bytes that are not fixed + per image x B (see measured_counters)."""
    return (_batch_sum_workspace_bytes(op, pass_, dtype, batch, backend)
            + _cluster_pos_reread_bytes(op, dtype, batch, backend))


# ---------------------------------------------------------------------------------- measured op calls
# Launches, global bytes and host aten ops are measured on the real kernel code, never estimated:
# the CUDA kernels on the CUDA emulation build (`apkernels._emulation.counters()`: every global load
# and store of every launch), the Triton kernels in the Triton interpreter
# (`interpreted_global_traffic`: every tl.load / tl.store / atomic). Both count bytes as the kernel
# asks for them (no cache model: a re-read counts again). Both run on the CPU, slowly, so batches up
# to max(MEASURED_BATCHES) run exactly and larger ones are extrapolated from B = 1, 2, 3: every
# launch's grid is per image (patch_pool, token_pool, inverse_index: one CTA or program per image;
# channel_reduce and the DAN programs: per (image, head[, tile])), has a batch dimension
# (scatter_rows), loops over the batch (the position gradient) or is a grid-stride loop over B x
# per-image elements, so a call's bytes are fixed + per_image * B (fixed: the position gradient
# written once), except pool_backward's batch-sum workspace, whose chunk count stops growing with B,
# and the CUDA patch_pool cluster kernel's pos reads (one per persistent cluster, the cluster count
# budgeted by B): modelled by _non_affine_bytes, taken out before the affine check and put back.
# The three batches are checked to be affine in B, launches and host ops equal.
# Affine up to AFFINE_TOLERANCE (relative, per-image bytes): a few loads depend on the data (DAN's
# grad_z reads t only where z > 0), so the per-image bytes of random inputs vary by a few bytes.
MEASURED_BATCHES = (1, 2, 3)
AFFINE_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Measured:
    """One call of an op (and its backward op) on paper-shaped inputs at one batch."""
    launches: int
    backward_launches: int  # launched by the backward op call(s)
    global_bytes: int  # read + written, every launch of the call
    host_aten_ops: tuple  # aten ops besides the kernels (None: not recorded)


def _measured(op: str, calls) -> Measured:
    """Measured from [(op call name, [per-launch dict with global_read/write_bytes], aten ops or None)]."""
    launches = [launch for _, per_call, _ in calls for launch in per_call]
    backward = [launch for name, per_call, _ in calls if name != op for launch in per_call]
    aten = None if any(ops is None for _, _, ops in calls) else tuple(o for _, _, ops in calls for o in ops)
    return Measured(len(launches), len(backward),
                    sum(launch["global_read_bytes"] + launch["global_write_bytes"] for launch in launches), aten)


@functools.lru_cache(maxsize=None)
def _emulated_call(op: str, pass_: str, dtype: str, batch: int):
    """Measured of one call of the CUDA op (and its backward op) run by the CUDA emulation build on CPU
    tensors at `batch` (aten ops recorded with the torch profiler), or None without that build."""
    try:
        from apkernels import _emulation
    except ImportError:
        return None
    if not _emulation.available(op):
        return None
    calls = []

    def call(name, op_fn, *args):
        _emulation.reset_counters()
        out, aten = call_recording_aten(op_fn, *args)
        calls.append((name, list(_emulation.counters()), aten))
        return out

    _run_op(op, pass_, dtype, batch, _emulation.SUFFIX, call=call)
    return _measured(op, calls)


@functools.lru_cache(maxsize=None)
def _interpreted_call(op: str, pass_: str, dtype: str, batch: int) -> Measured:
    """Measured of one call of the Triton op (and its backward op) run by the Triton interpreter on CPU
    tensors at `batch` (aten ops recorded with the torch profiler, the interpreter's own copies
    inside each launch left out)."""
    import torch

    calls = []

    def call(name, op_fn, *args):
        with interpreted_global_traffic() as launches:
            out, aten = call_recording_aten(op_fn, *args)
        calls.append((name, launches, aten))
        return out

    with torch.no_grad():
        _run_op(op, pass_, dtype, batch, "_triton", call=call)
    return _measured(op, calls)


def measured_counters(measure, how: str, op: str, pass_: str, dtype: str, batch: int):
    """{"launches", "backward_launches", "global_bytes", "global_bytes_source", "host_aten_ops"} of one
    call of the op (and its backward op) at `batch`, from `measure(op, pass_, dtype, batch)` (a
    Measured, or None when it cannot run here: then None), named `how` in the source.

    Batches up to max(MEASURED_BATCHES) run exactly; larger ones are extrapolated from them after
    checking that launches and host ops are the same and bytes affine in the batch (RuntimeError
    otherwise)."""
    if batch <= max(MEASURED_BATCHES):
        measured = measure(op, pass_, dtype, batch)
        return None if measured is None else _counters(measured, measured.global_bytes, f"{how} at B={batch}")
    measured = [measure(op, pass_, dtype, b) for b in MEASURED_BATCHES]
    if measured[0] is None:
        return None
    # pool_backward's batch-sum workspace and patch_pool's per-cluster pos reads are modelled, not
    # extrapolated: out before, back after.
    backend = "triton" if how == "interpreted" else "cuda"
    measured = [dataclasses.replace(m, global_bytes=m.global_bytes - _non_affine_bytes(op, pass_, dtype, b, backend))
                for b, m in zip(MEASURED_BATCHES, measured)]
    same = {(m.launches, m.backward_launches, m.host_aten_ops) for m in measured}
    steps = [(m1.global_bytes - m0.global_bytes) / (b1 - b0)
             for (b0, m0), (b1, m1) in zip(zip(MEASURED_BATCHES, measured), zip(MEASURED_BATCHES[1:], measured[1:]))]
    if len(same) != 1 or max(steps) - min(steps) > AFFINE_TOLERANCE * max(steps):
        raise RuntimeError(f"{op} {pass_} {dtype}: {how} {measured} at B={MEASURED_BATCHES} are not affine in the "
                           f"batch: cannot extrapolate to B={batch}")
    per_image = (measured[-1].global_bytes - measured[0].global_bytes) / (MEASURED_BATCHES[-1] - MEASURED_BATCHES[0])
    global_bytes = round(measured[0].global_bytes + (batch - MEASURED_BATCHES[0]) * per_image)
    global_bytes += _non_affine_bytes(op, pass_, dtype, batch, backend)
    batches = ",".join(map(str, MEASURED_BATCHES))
    return _counters(measured[0], global_bytes, f"{how} at B={batches}, extrapolated (affine in B)")


def _counters(measured: Measured, global_bytes: int, source: str) -> dict:
    return {"launches": measured.launches, "backward_launches": measured.backward_launches,
            "global_bytes": global_bytes, "global_bytes_source": source,
            "host_aten_ops": None if measured.host_aten_ops is None else list(measured.host_aten_ops)}


def emulated_counters(op: str, pass_: str, dtype: str, batch: int):
    """measured_counters of the CUDA op on the CUDA emulation build (the real kernel code, every access
    counted; about 0.2 s per image and op here), or None without that build."""
    return measured_counters(_emulated_call, "emulated", op, pass_, dtype, batch)


def interpreted_counters(op: str, pass_: str, dtype: str, batch: int):
    """measured_counters of the Triton op run by the Triton interpreter in this process, whose Triton
    kernels must be interpreted (TRITON_INTERPRET=1 set before apkernels was imported; a compiled
    launch raises RuntimeError)."""
    return measured_counters(_interpreted_call, "interpreted", op, pass_, dtype, batch)


def interpreted_counters_in_subprocess(requests) -> list:
    """[interpreted_counters(op, pass_, dtype, batch) for each request], run in a child Python with
    TRITON_INTERPRET=1 (the report's own process compiles the Triton kernels, so it cannot interpret
    them); its progress goes to stderr."""
    code = ("import json, sys\nfrom benchmarks import kernel_report as r\n"
            "print(json.dumps(r.interpreted_counters_of(json.load(sys.stdin))))\n")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps([list(r) for r in requests]), env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError("measuring the Triton kernels in the interpreter failed (its error is above)")
    return json.loads(done.stdout.splitlines()[-1])


def interpreted_counters_of(requests) -> list:
    """The child of interpreted_counters_in_subprocess: one interpreted_counters per request, with a
    progress bar."""
    from tqdm import tqdm

    return [interpreted_counters(*request)
            for request in tqdm(requests, desc="Triton global bytes (interpreter)", unit="row", file=sys.stderr,
                                dynamic_ncols=True, mininterval=1.0)]


# ---------------------------------------------------------------------------------- host aten ops
# Aten ops that neither touch tensor data nor launch work: allocations, views, metadata. Such an op
# still counts when an aten op it calls does work (a `contiguous` or `to` that copies, a `reshape`
# that cannot view).
_METADATA_ATEN_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "view_as", "_unsafe_view",
    "as_strided", "expand", "expand_as", "permute", "select", "slice", "unsqueeze", "squeeze", "reshape",
    "_reshape_alias", "t", "transpose", "detach", "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "contiguous", "to", "type_as", "unflatten", "flatten", "unbind", "split", "chunk", "narrow",
    "resolve_conj", "resolve_neg", "set_", "result_type",
})


def host_aten_ops(events) -> list:
    """Names of the aten ops among torch profiler `events` that do work besides the kernels (copies,
    fills, conversions, reductions, host syncs such as `is_nonzero`), in call order. An aten op
    called by another counts as its caller (the fill_ inside zeros is `zeros`, the copy inside a
    copying `contiguous` is `contiguous`); allocations and views are left out, and so is what runs
    inside an interpreted Triton launch (INTERPRETED_LAUNCH: the interpreter's own copies)."""
    def aten(event):
        return event.name.startswith("aten::")

    def does_work(event):
        return (aten(event) and event.name[6:] not in _METADATA_ATEN_OPS) or any(map(does_work, event.cpu_children))

    def outermost(event):
        parent = event.cpu_parent
        while parent is not None:
            if aten(parent) or parent.name == INTERPRETED_LAUNCH:
                return False
            parent = parent.cpu_parent
        return True

    events = sorted((e for e in events if aten(e) and outermost(e)), key=lambda e: e.time_range.start)
    return [e.name[6:] for e in events if does_work(e)]


def call_recording_aten(fn, *args):
    """(fn(*args), host_aten_ops of the call), with the torch profiler on the CPU (the autograd
    profiler without kineto: the same aten events, without kineto's log lines on every call)."""
    from torch.autograd.profiler import profile

    with profile(use_kineto=False) as prof:
        out = fn(*args)
    return out, host_aten_ops(prof.function_events)


# ---------------------------------------------------------------------------------- Triton side
INTERPRETED_LAUNCH = "kernel_report: interpreted Triton launch"  # the profiler range of each launch


@contextlib.contextmanager
def interpreted_global_traffic():
    """Counts the global memory traffic of the Triton kernels the interpreter runs inside the block:
    yields a list that gets one dict per launch, {"kernel", "global_read_bytes",
    "global_write_bytes"}. A load or store moves (mask-true elements) x (element size) bytes; an
    atomic reads and writes its active elements (as the CUDA emulator counts atomics). No cache
    model: a re-read counts again.

    The hook is the interpreter's builder, the one place every memory op of an interpreted kernel
    goes through (triton >= 3.6): create_masked_load / create_masked_store (tl.load / tl.store,
    masked or not, block pointers and tensor descriptors all end there), create_atomic_rmw and
    create_atomic_cas; InterpretedFunction.run opens each launch (and marks it for the profiler,
    INTERPRETED_LAUNCH). All are restored on exit. A compiled (not interpreted) launch inside the
    block raises RuntimeError."""
    import numpy as np
    from torch.autograd.profiler import record_function
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    builder = interpreter.interpreter_builder
    hooked = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    if any(name in vars(builder) for name in hooked):
        raise RuntimeError("interpreted_global_traffic: already counting (blocks do not nest)")
    launches = []
    original = {name: getattr(builder, name) for name in hooked}

    def count(ptrs, mask, read: bool, write: bool):
        if not launches:
            raise RuntimeError("a Triton memory op outside a launch")
        active = ptrs.data.size if mask is None else int(np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape)))
        nbytes = active * max(1, ptrs.get_element_ty().primitive_bitwidth // 8)  # int1 is stored in a byte
        launches[-1]["global_read_bytes"] += nbytes if read else 0
        launches[-1]["global_write_bytes"] += nbytes if write else 0

    def masked_load(ptrs, mask, *args, **kwargs):
        count(ptrs, mask, read=True, write=False)
        return original["create_masked_load"](ptrs, mask, *args, **kwargs)

    def masked_store(ptrs, value, mask, *args, **kwargs):
        count(ptrs, mask, read=False, write=True)
        return original["create_masked_store"](ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(rmw_op, ptr, val, mask, *args, **kwargs):
        count(ptr, mask, read=True, write=True)
        return original["create_atomic_rmw"](rmw_op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(ptr, cmp, val, *args, **kwargs):
        count(ptr, None, read=True, write=True)
        return original["create_atomic_cas"](ptr, cmp, val, *args, **kwargs)

    interpreted_run, compiled_run = interpreter.InterpretedFunction.run, JITFunction.run

    def run(self, *args, **kwargs):
        launches.append({"kernel": self.__name__, "global_read_bytes": 0, "global_write_bytes": 0})
        with record_function(INTERPRETED_LAUNCH):
            return interpreted_run(self, *args, **kwargs)

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is compiled, not interpreted: its memory traffic cannot be counted "
                           "(set TRITON_INTERPRET=1 before importing apkernels)")

    for name, hook in zip(hooked, (masked_load, masked_store, atomic_rmw, atomic_cas)):
        setattr(builder, name, hook)
    interpreter.InterpretedFunction.run, JITFunction.run = run, refuse
    try:
        yield launches
    finally:
        for name in hooked:
            delattr(builder, name)
        interpreter.InterpretedFunction.run, JITFunction.run = interpreted_run, compiled_run


# Aten ops the Triton launchers run besides their kernels: (op, pass, dtype, batch) -> [name].
recorded_aten = {}


def triton_launches(op: str, pass_: str, dtype: str, batch: int) -> list:
    """[(op call name, JITFunction, grid, args, kwargs)] of one call of the Triton op (and its backward),
    recorded from the launcher without running anything (the aten ops of the calls go to
    recorded_aten)."""
    import torch
    from triton.runtime.jit import JITFunction

    from apkernels.triton_kernels import _common

    recorded, aten, current = [], [], []

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((current[-1], self, grid, args, kwargs))

    def call(name, op_fn, *args):
        current.append(name)
        out, ops = call_recording_aten(op_fn, *args)
        aten.extend(ops)
        return out

    saved = JITFunction.run, getattr(_common, "check_launch", None)
    JITFunction.run = record
    if saved[1] is not None:
        _common.check_launch = lambda *a, **k: None  # CPU tensors stand in for CUDA ones
    # pool_backward checks the index range on what its first kernel wrote: nothing runs here.
    from apkernels.triton_kernels import pool_backward as triton_pool_backward
    saved_range_check = getattr(triton_pool_backward, "check_index_range", None)
    if saved_range_check is not None:
        triton_pool_backward.check_index_range = lambda *a, **k: None
    try:
        with torch.no_grad():
            _run_op(op, pass_, dtype, batch, "_triton", call=call)
        recorded_aten[(op, pass_, dtype, batch)] = aten
    finally:
        JITFunction.run = saved[0]
        if saved[1] is not None:
            _common.check_launch = saved[1]
        if saved_range_check is not None:
            triton_pool_backward.check_index_range = saved_range_check
    return recorded


def _run_op(op, pass_, dtype, batch, suffix, call=None):
    """One call of torch.ops.apkernels.<op><suffix> (and its backward op) on paper-shaped inputs.
    `call(name, op_fn, *args)`, when given, makes each op call (name: the op without suffix), e.g.
    to measure it; building the inputs stays outside."""
    import torch

    from benchmarks import specs as common

    spec = common.OPS[op]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    inputs = spec.make_inputs(batch, torch_dtype, "cpu", torch.Generator().manual_seed(0))
    ops = torch.ops.apkernels

    def fn(name):
        op_fn = getattr(ops, name + suffix)
        return op_fn if call is None else functools.partial(call, name, op_fn)
    if op == "patch_pool":
        x = inputs["x"]
        tokens, index = fn("patch_pool")(x, common.APVIT_KEEP, inputs["pos"], "sum_abs")
        if pass_ == "fwd+bwd":  # the forward did not run: valid kept positions stand in for its index
            fn("pool_backward")(_grad_like(tokens), _kept(index), x.shape[2] * x.shape[3], True)
    elif op == "token_pool":
        x = inputs["x"]
        tokens, index = fn("token_pool")(x, inputs["q"], inputs["k"], common.APVIT_TOKEN_KEEP, common.TOKEN_SCALE,
                                         "sum")
        if pass_ == "fwd+bwd":
            fn("pool_backward")(_grad_like(tokens), _kept(index), x.shape[1], False)
    elif op == "dan_spatial_pool":
        g, s = fn("dan_spatial_pool")(inputs["x"], inputs["z"])
        if pass_ == "fwd+bwd":
            fn("dan_spatial_pool_backward")(_grad_like(g), inputs["x"], inputs["z"], s)
    elif op == "dan_head_fusion":
        fused, heads = fn("dan_head_fusion")(inputs["g"], inputs["gate_logits"])
        if pass_ == "fwd+bwd":
            fn("dan_head_fusion_backward")(_grad_like(fused), _grad_like(heads), inputs["g"],
                                           inputs["gate_logits"], heads)
    return inputs


def _grad_like(t):
    """A random upstream gradient shaped like `t` (finite values: no overflow warnings from the interpreter)."""
    import torch

    return torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(t.dtype)


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
        return dict(batch=batch, N=c.APVIT_GRID * c.APVIT_GRID, C=c.APVIT_CHANNELS, keep=c.APVIT_KEEP)
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


def kernel_entry(name, resources, grid, threads, dynamic_shared, persistent=False):
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
        # declared so by its plan, or a grid of whole SMs that fits in one wave (a kernel that loops)
        "persistent": bool(persistent) or (ctas % SMS == 0 and ctas <= occ.ctas_per_sm * SMS),
    }


def cuda_rows(resources: dict, batches, dtypes, emulate: bool = False, ops=OPS) -> list:
    rows = []
    for op in ops:
        for pass_ in PASSES:
            for dtype in dtypes:
                for batch in batches:
                    kernels = []
                    plan = cuda_plan(op, pass_, dtype, op_shapes(op, batch))
                    for launch in plan:
                        matches = [n for n in resources if re.search(launch.kernel, n)]
                        if not matches:
                            raise RuntimeError(f"no compiled kernel matches {launch.kernel!r} (op {op})")
                        name = min(matches, key=len)
                        kernels.append(kernel_entry(_short(name), resources[name], launch.grid, launch.threads,
                                                    launch.dynamic_shared_bytes, launch.persistent))
                    counters = emulated_counters(op, pass_, dtype, batch) if emulate else None
                    rows.append(make_row(op, "cuda", pass_, dtype, batch, kernels,
                                         counters=counters or _planned_launches(op, pass_, dtype, batch)))
    return rows


def _planned_launches(op, pass_, dtype, batch) -> dict:
    """Launches and backward launches of one CUDA op call as cuda_plan writes them out."""
    shapes = op_shapes(op, batch)
    launches = len(cuda_plan(op, pass_, dtype, shapes))
    return {"launches": launches, "backward_launches": launches - len(cuda_plan(op, "fwd", dtype, shapes))}


def emulated_traffic_rows(batches, dtypes, ops=OPS) -> list:
    """CUDA rows with the emulator's launches, global bytes and host ops only (no nvcc: no kernel
    resources)."""
    return [make_row(op, "cuda", pass_, dtype, batch, [], counters=emulated_counters(op, pass_, dtype, batch))
            for op in ops for pass_ in PASSES for dtype in dtypes for batch in batches]


def triton_rows(batches, dtypes, ops=OPS, global_bytes: bool = False) -> list:
    """Triton rows: each launch compiled for sm_90; with `global_bytes`, the traffic measured in the
    interpreter (a child process)."""
    rows, cache, requests = [], {}, []
    for op in ops:
        for pass_ in PASSES:
            for dtype in dtypes:
                for batch in batches:
                    kernels, backward = [], 0
                    for name, jit_fn, grid, args, kwargs in triton_launches(op, pass_, dtype, batch):
                        grid = tuple(grid) if not callable(grid) else tuple(grid(kwargs))
                        res, shared, warps = triton_compile(jit_fn, args, kwargs, cache)
                        kernels.append(kernel_entry(jit_fn.__name__, res, grid, warps * 32, shared))
                        backward += name != op
                    recorded = {"launches": len(kernels), "backward_launches": backward,
                                "host_aten_ops": recorded_aten.get((op, pass_, dtype, batch), [])}
                    rows.append(make_row(op, "triton", pass_, dtype, batch, kernels, counters=recorded))
                    requests.append((op, pass_, dtype, batch))
    if global_bytes:
        for row, measured in zip(rows, interpreted_counters_in_subprocess(requests)):
            if (measured["launches"], measured["backward_launches"]) != (row["launches"], row["backward_launches"]):
                raise RuntimeError(f"{row['op']} {row['pass']} {row['dtype']} B={row['batch']}: the interpreter ran "
                                   f"{measured['launches']} launches, the launcher recorded {row['launches']}")
            row["global_bytes"] = measured["global_bytes"]
            row["global_bytes_source"] = measured["global_bytes_source"]
            # measured with the kernels running (checks that read what a kernel wrote included)
            row["host_aten_ops"] = measured["host_aten_ops"]
    return rows


def make_row(op, backend, pass_, dtype, batch, kernels, counters):
    """One row of the report. `counters` (or None): launches, backward_launches, global_bytes,
    global_bytes_source, host_aten_ops, as far as measured (launches default to the kernels)."""
    from benchmarks import specs as common

    counters = counters or {}
    return {
        "op": op,
        "backend": backend,
        "pass": pass_,
        "dtype": dtype,
        "batch": batch,
        "paper_scale": batch == max(common.OPS[op].batches),
        "global_bytes": counters.get("global_bytes"),
        "global_bytes_source": counters.get("global_bytes_source"),
        "minimal_bytes": minimal_bytes(op, pass_, dtype, batch),
        "launches": counters.get("launches", len(kernels)),
        "backward_launches": counters.get("backward_launches"),
        "host_aten_ops": counters.get("host_aten_ops"),
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


# ---------------------------------------------------------------------------------- targets
# The static targets of the kernel work, per row (issue: minimal traffic, one launch per forward, at
# most two per backward, no host copies or fills, no spills, >= 2 waves or a persistent grid at the
# paper batch, >= 16 resident warps per SM).
TRAFFIC_TARGET = {"fwd": 1.05, "fwd+bwd": 1.10}  # global bytes / minimal bytes, at most
FORWARD_LAUNCHES_TARGET = 1
BACKWARD_LAUNCHES_TARGET = 2  # at most
WAVES_TARGET = 2  # at least, unless the grid is persistent
WARPS_PER_SM_TARGET = 16  # at least
TARGETS = {
    "bytes": "global / minimal bytes <= 1.05 (fwd), <= 1.10 (fwd+bwd)",
    "launches": "1 launch per forward, <= 2 per backward",
    "host ops": "no aten ops besides the kernels (copies, fills, conversions, syncs)",
    "spills": "no register spills",
    "waves": ">= 2 waves or a persistent grid (at the paper batch)",
    "warps/SM": ">= 16 resident warps per SM, every kernel",
}


def evaluate_targets(row) -> dict:
    """{target: {"met": True / False / None, "value": str}} of a row; met None where the row has no
    measurement of it (value "n/a") or the target does not apply (value "-")."""
    def result(met, value):
        return {"met": met, "value": value}

    out = {}
    ratio = traffic_ratio(row)
    out["bytes"] = (result(None, "n/a") if ratio is None
                    else result(ratio <= TRAFFIC_TARGET[row["pass"]], f"{ratio:.2f}"))
    backward = row.get("backward_launches")
    if backward is None:
        out["launches"] = result(None, "n/a")
    else:
        forward = row["launches"] - backward
        met = forward == FORWARD_LAUNCHES_TARGET and backward <= BACKWARD_LAUNCHES_TARGET
        out["launches"] = result(met, str(forward) if row["pass"] == "fwd" else f"{forward}+{backward}")
    aten = row.get("host_aten_ops")
    out["host ops"] = result(None, "n/a") if aten is None else result(not aten, ", ".join(aten) or "none")
    kernels = row["kernels"]
    out["spills"] = result(None, "n/a") if not kernels else result(row["spills"] == 0, f"{row['spills']} B")
    if not kernels:
        out["waves"] = result(None, "n/a")
    elif not row["paper_scale"]:
        out["waves"] = result(None, "-")
    else:
        short = [k for k in kernels if not k["persistent"] and (k["waves"] or 0) < WAVES_TARGET]
        out["waves"] = result(not short, "ok" if not short else f"{min(k['waves'] or 0 for k in short):.2f}")
    out["warps/SM"] = result(None, "n/a") if not kernels else result(
        row["min_warps_per_sm"] >= WARPS_PER_SM_TARGET, str(row["min_warps_per_sm"]))
    return out


def format_check_table(rows) -> str:
    """One line per row, one column per target: met / MISSED with the value, n/a (not measured here)
    or - (does not apply); then the counts."""
    names = list(TARGETS)
    lines = ["| op | backend | pass | dtype | B | " + " | ".join(names) + " |", "|" + "---|" * (5 + len(names))]
    counts = {True: 0, False: 0, None: 0}
    for r in rows:
        cells = []
        for name in names:
            t = r["targets"][name]
            counts[t["met"]] += t["value"] != "-"
            cells.append(t["value"] if t["met"] is None else f"{'met' if t['met'] else '**MISSED**'} {t['value']}")
        lines.append("| " + " | ".join([r["op"], r["backend"], r["pass"], r["dtype"], str(r["batch"])] + cells) + " |")
    legend = "; ".join(f"{name}: {what}" for name, what in TARGETS.items())
    return ("\n".join(lines) + f"\n\nTargets: {legend}. {counts[True]} met, {counts[False]} missed, {counts[None]} "
            "not measured (n/a; - = does not apply).")


# ---------------------------------------------------------------------------------- output
def traffic_ratio(row):
    """Global bytes moved / minimal bytes of a row, or None where not measured."""
    return None if row["global_bytes"] is None else row["global_bytes"] / row["minimal_bytes"]


def _host_ops(row) -> str:
    aten = row.get("host_aten_ops")
    return "n/a" if aten is None else ", ".join(aten) or "none"


def format_traffic_table(rows) -> str:
    """Global bytes moved / minimal bytes per row, and how each was measured."""
    lines = ["| op | backend | pass | dtype | B | launches | host aten ops | global bytes | minimal bytes | "
             "global / minimal | measured |",
             "|" + "---|" * 11]
    for r in rows:
        ratio = traffic_ratio(r)
        lines.append("| " + " | ".join([
            r["op"], r["backend"], r["pass"], r["dtype"], str(r["batch"]), str(r["launches"]), _host_ops(r),
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
            waves = f"{k['waves']:.2f}" + (" (persistent)" if k.get("persistent") else "")
            lines.append("| " + " | ".join(head + [
                f"`{k['kernel']}`", str(k["registers"]), str(k["spills"]), f"{k['shared_bytes'] / 1024:.1f} KB",
                str(k["ctas_per_sm"]), str(k["warps_per_sm"]), k["occupancy_limiter"],
                "x".join(map(str, k["grid"])), waves] + tail) + " |")
    return "\n".join(lines)


NOTE = (
    "global bytes: measured, never estimated, with --global-bytes: CUDA rows on the CUDA emulation build "
    "(apkernels._emulation counts every global load and store of the real kernel code), Triton rows in the Triton "
    "interpreter (every tl.load / tl.store / atomic: mask-true elements x element size); bytes read + written, every "
    "launch of the op call and its backward, no cache model (a re-read counts again). Batches up to "
    f"{max(MEASURED_BATCHES)} run exactly, larger ones are extrapolated from B={','.join(map(str, MEASURED_BATCHES))} "
    "(every grid is per image, has a batch dimension or loops over B x per-image elements: bytes are affine in B, "
    "checked on the three). n/a where not measured. launches = kernels one op call launches (CUDA: the host code's "
    "plan, or the emulator's count; Triton: recorded from the launcher); host aten ops = the aten ops the call runs "
    "besides its kernels (copies, fills, conversions, reductions, host syncs; torch profiler on the CPU, while the "
    "kernels run with --global-bytes; Triton without it: while the launcher runs with its kernels intercepted; CUDA "
    "without it: n/a), their traffic not in global bytes.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} to this file")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--global-bytes", "--emulated-counters", dest="global_bytes", action="store_true",
                        help="measure launches, global bytes and host aten ops: CUDA rows on the CUDA emulation build "
                             "(apkernels._emulation), Triton rows in the Triton interpreter (slow: B=1,2,3 run, "
                             "larger batches extrapolated)")
    parser.add_argument("--check", action="store_true",
                        help="also print the targets per row (met / missed); exit status 0 unless --strict")
    parser.add_argument("--strict", action="store_true", help="with --check: exit 1 when a target is missed")
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
    # Kineto logs two lines per profiler start (the host aten ops profile every op call) unless
    # its level is above all of its levels; read when torch is first imported (below).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    from benchmarks import specs as common

    batches = (256,) if args.quick else sorted({b for spec in common.OPS.values() for b in spec.batches})
    dtypes = ("bf16",) if args.quick else DTYPES
    batches = tuple(args.batch) if args.batch else batches
    dtypes = tuple(args.dtype) if args.dtype else dtypes
    ops = tuple(args.op) if args.op else OPS
    backends = args.backend or BACKENDS
    rows = []
    if "cuda" in backends:
        if find_nvcc() is None and args.global_bytes:
            print("kernel_report: nvcc not found: CUDA rows carry the emulator's measurements only", file=sys.stderr)
            rows += emulated_traffic_rows(batches, dtypes, ops)
        elif find_nvcc() is None:
            print("kernel_report: nvcc not found: CUDA rows skipped", file=sys.stderr)
        else:
            resources = cuda_resources(progress=lambda m: print(m, file=sys.stderr), csrc=args.csrc)
            rows += cuda_rows(resources, batches, dtypes, emulate=args.global_bytes, ops=ops)
    if "triton" in backends:
        rows += triton_rows(batches, dtypes, ops, global_bytes=args.global_bytes)
    for row in rows:
        row["targets"] = evaluate_targets(row)
    with_kernels = [r for r in rows if r["kernels"]]  # (none when only the emulator's traffic was measured)
    tables = [format_table(with_kernels)] if with_kernels else []
    measured = [r for r in rows if r["global_bytes"] is not None]
    if measured:  # global bytes moved / minimal bytes of the real kernel code, and how each was measured
        tables.append("Global bytes moved (CUDA: emulation build; Triton: interpreter):\n\n"
                      + format_traffic_table(measured))
    if args.check or args.strict:
        tables.append("Targets:\n\n" + format_check_table(rows))
    text = "\n\n".join(tables) + "\n\n" + NOTE
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    missed = [r for r in rows if any(t["met"] is False for t in r["targets"].values())]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
