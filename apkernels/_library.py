"""The op registry: every op of ``torch.ops.apkernels`` once, with its schema and where it lives.

Every list of ops in the project derives from ``OP_TABLE``: the public functions
(``apkernels.OPS``), the Triton modules, the tests' and benchmarks' op lists. The schemas are
defined here so they exist whether or not the compiled extension ``apkernels._C`` is present;
``_C`` only registers kernels for them (``TORCH_LIBRARY_IMPL(apkernels, CPU/CUDA, m)``) and the
Triton backend registers ``<op>_triton``.

Adding an op: one ``OpDef`` entry here, then its own files (see DEVELOPERS.md).
"""
import dataclasses

import importlib.util

import torch


@dataclasses.dataclass(frozen=True)
class OpDef:
    name: str
    schema: str  # without the name; `<name>_triton` gets the same schema
    module: str  # file stem under apkernels/ops/ and apkernels/triton_kernels/ that implements it
    public: bool = True  # a validated functional entry point `apkernels.<name>` (else a backward op)
    backward: str | None = None  # the op of this table computing its gradient


OP_TABLE = (
    # Backward of both pooling ops: dx[b, index[b, j]] += grad_tokens[b, j] into zero rows
    # [B, num_rows, C] (repeated indices accumulate, in ascending j); with reduce_batch also their sum
    # over the batch (the position-embedding gradient).
    OpDef(
        "pool_backward",
        "(Tensor grad_tokens, Tensor index, SymInt num_rows, bool reduce_batch) -> (Tensor, Tensor)",
        module="pool_backward",
        public=False,
    ),
    # APViT attentive patch pooling: score positions of x [B, C, H, W] over channels, keep the top
    # `keep` (ascending position), gather (x as tokens + pos). Returns (tokens [B, keep, C], index).
    OpDef(
        "patch_pool",
        "(Tensor x, SymInt keep, Tensor? pos, str score) -> (Tensor, Tensor)",
        module="patch_pool",
        backward="pool_backward",
    ),
    # APViT attentive token pooling: score tokens 1..N-1 by the CLS-row logits q[:, :, 0] . k * scale
    # reduced over heads, keep CLS + the top `keep`. Returns (tokens [B, keep + 1, C], index).
    OpDef(
        "token_pool",
        "(Tensor x, Tensor q, Tensor k, SymInt keep, float scale, str score) -> (Tensor, Tensor)",
        module="token_pool",
        backward="pool_backward",
    ),
    # DAN spatial attention + global average pool: g[b, m, c] = mean_p x[b, c, p] * s[b, m, p] with
    # s[b, m, p] = sum_c2 relu(z[b, m, c2, p]). Returns (g [B, M, C], s [B, M, H*W] in the accumulation
    # dtype: fp32, fp64 for fp64): the backward reads the saved s instead of recomputing it from z.
    OpDef(
        "dan_spatial_pool",
        "(Tensor x, Tensor z) -> (Tensor, Tensor)",
        module="dan_spatial_pool",
        backward="dan_spatial_pool_backward",
    ),
    OpDef(
        "dan_spatial_pool_backward",
        "(Tensor grad_g, Tensor x, Tensor z, Tensor s) -> (Tensor, Tensor)",
        module="dan_spatial_pool",
        public=False,
    ),
    # DAN channel gating + attention fusion: heads = g * sigmoid(gate_logits), log_softmax over the
    # heads when M > 1, fused = heads.sum(1). Returns (fused [B, C], heads [B, M, C]).
    OpDef(
        "dan_head_fusion",
        "(Tensor g, Tensor gate_logits) -> (Tensor, Tensor)",
        module="dan_head_fusion",
        backward="dan_head_fusion_backward",
    ),
    OpDef(
        "dan_head_fusion_backward",
        "(Tensor grad_fused, Tensor grad_heads, Tensor g, Tensor gate_logits, Tensor heads) -> (Tensor, Tensor)",
        module="dan_head_fusion",
        public=False,
    ),
)

OP_DEFS = {op.name: op for op in OP_TABLE}
# The public ops, in documentation order (apkernels.<name>, benchmarks, the demo table).
OPS = tuple(op.name for op in OP_TABLE if op.public)
# Every op of torch.ops.apkernels (backward ops included) -> schema.
SCHEMAS = {op.name: op.schema for op in OP_TABLE}
# The per-op modules of apkernels/ops and apkernels/triton_kernels, shared backward modules first.
MODULES = tuple(dict.fromkeys(op.module for op in OP_TABLE))

TRITON_SUFFIX = "_triton"
# Every op exists once per suffix: "" (the compiled CPU / CUDA kernels, or the reference fallback)
# and "_triton"; fake and autograd registrations (ops/_register.py) cover each.
OP_SUFFIXES = ("", TRITON_SUFFIX)
# The CUDA emulation build (apkernels._C_emulated, APKERNELS_CUDA_EMULATION=1) registers the CUDA
# kernels for CPU tensors as "<op>_cuda_emulated" (apkernels/_emulation.py).
EMULATED_SUFFIX = "_cuda_emulated"
if importlib.util.find_spec(f"{__package__}._C_emulated") is not None:
    OP_SUFFIXES += (EMULATED_SUFFIX,)

LIB = torch.library.Library("apkernels", "DEF")
for _op in OP_TABLE:
    for _suffix in OP_SUFFIXES:
        LIB.define(_op.name + _suffix + _op.schema)


def qualname(name: str) -> str:
    return f"apkernels::{name}"


def ops_of_module(module: str) -> tuple:
    """The ops (forward and backward) a per-op module implements."""
    return tuple(op.name for op in OP_TABLE if op.module == module)


def has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), dispatch_key)


def register_kernel(name: str, fn, dispatch_keys=("CPU", "CUDA")) -> None:
    """Register a Python kernel for `name` on the given dispatch keys."""
    for key in dispatch_keys:
        LIB.impl(name, fn, key)
