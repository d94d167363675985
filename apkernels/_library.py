"""The op schemas of ``torch.ops.apkernels``: defined here, in one place, so they exist whether or
not the compiled extension ``apkernels._C`` is present. ``_C`` only registers kernels for them
(``TORCH_LIBRARY_IMPL(apkernels, CPU/CUDA, m)``); the Triton backend registers ``<op>_triton``.
"""
import torch

LIB = torch.library.Library("apkernels", "DEF")

# name -> schema (without the name). Every op also exists as `<name>_triton` with the same schema.
SCHEMAS = {
    # APViT attentive patch pooling: score positions of x [B, C, H, W] over channels, keep the top
    # `keep` (ascending position), gather (x as tokens + pos). Returns (tokens [B, keep, C], index).
    "patch_pool": "(Tensor x, int keep, Tensor? pos, str score) -> (Tensor, Tensor)",
    # APViT attentive token pooling: score tokens 1..N-1 by the CLS-row logits q[:, :, 0] . k * scale
    # reduced over heads, keep CLS + the top `keep`. Returns (tokens [B, keep + 1, C], index).
    "token_pool": "(Tensor x, Tensor q, Tensor k, int keep, float scale, str score) -> (Tensor, Tensor)",
    # Backward of both pooling ops: scatter grad_tokens [B, K, C] into zero rows [B, num_rows, C] at
    # index; with reduce_batch also their sum over the batch (the position-embedding gradient).
    "pool_backward": "(Tensor grad_tokens, Tensor index, int num_rows, bool reduce_batch) -> (Tensor, Tensor)",
    # DAN spatial attention + global average pool: g[b, m, c] = mean_p x[b, c, p] * sum_c2 relu(z[b, m, c2, p]).
    "dan_spatial_pool": "(Tensor x, Tensor z) -> Tensor",
    "dan_spatial_pool_backward": "(Tensor grad_g, Tensor x, Tensor z) -> (Tensor, Tensor)",
    # DAN channel gating + attention fusion: heads = g * sigmoid(gate_logits), log_softmax over the
    # heads when M > 1, fused = heads.sum(1). Returns (fused [B, C], heads [B, M, C]).
    "dan_head_fusion": "(Tensor g, Tensor gate_logits) -> (Tensor, Tensor)",
    "dan_head_fusion_backward": (
        "(Tensor grad_fused, Tensor grad_heads, Tensor g, Tensor gate_logits, Tensor heads) -> (Tensor, Tensor)"
    ),
}

TRITON_SUFFIX = "_triton"

for _name, _schema in SCHEMAS.items():
    LIB.define(_name + _schema)
    LIB.define(_name + TRITON_SUFFIX + _schema)


def qualname(name: str) -> str:
    return f"apkernels::{name}"


def has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), dispatch_key)


def register_kernel(name: str, fn, dispatch_keys=("CPU", "CUDA")) -> None:
    """Register a Python kernel for `name` on the given dispatch keys."""
    for key in dispatch_keys:
        LIB.impl(name, fn, key)
