"""Triton DAN channel gating + attention fusion and its backward, one program per
(image, channel block) holding all M heads in one tile (every input read once, every output written
once: a single pass): heads = g * sigmoid(gate_logits), log_softmax over the
heads when M > 1 (M == 1: no softmax, as the official code), fused = heads.sum(1); fp32 math."""
import torch
import triton
import triton.language as tl

from .. import _checks
from . import _common

OP = "dan_head_fusion"
DTYPES = _common.HALF_AND_FLOAT + (torch.float64,)


@triton.jit
def _dan_head_fusion_kernel(
    g_ptr, gate_ptr, fused_ptr, heads_ptr,
    M, C, NUM_C_BLOCKS,
    sg_b, sg_m, sg_c, sa_b, sa_m, sa_c, sf_b, sf_c, sh_b, sh_m, sh_c,
    LOG_SOFTMAX: tl.constexpr, ACC: tl.constexpr, M_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_C_BLOCKS).to(tl.int64)
    c = ((pid % NUM_C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m = tl.arange(0, M_PAD).to(tl.int64)
    in_m = m < M
    mask = in_m[:, None] & (c < C)[None, :]
    g = tl.load(g_ptr + b * sg_b + m[:, None] * sg_m + c[None, :] * sg_c, mask=mask, other=0.0).to(ACC)
    a = tl.load(gate_ptr + b * sa_b + m[:, None] * sa_m + c[None, :] * sa_c, mask=mask, other=0.0).to(ACC)
    heads = g * (1.0 / (1.0 + tl.exp(-a)))
    if LOG_SOFTMAX:
        shifted = tl.where(in_m[:, None], heads, float("-inf"))
        top = tl.max(shifted, 0)
        lse = top + tl.log(tl.sum(tl.exp(shifted - top[None, :]), 0))
        heads = heads - lse[None, :]
    heads = tl.where(mask, heads, 0.0)
    fused = tl.sum(heads, 0)
    tl.store(heads_ptr + b * sh_b + m[:, None] * sh_m + c[None, :] * sh_c,
             _common.round_to(heads, heads_ptr.dtype.element_ty), mask=mask)
    tl.store(fused_ptr + b * sf_b + c * sf_c, _common.round_to(fused, fused_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _dan_head_fusion_backward_kernel(
    dfused_ptr, dheads_ptr, g_ptr, gate_ptr, heads_ptr, dg_ptr, dgate_ptr,
    M, C, NUM_C_BLOCKS,
    sf_b, sf_c, sd_b, sd_m, sd_c, sg_b, sg_m, sg_c, sa_b, sa_m, sa_c, sh_b, sh_m, sh_c,
    LOG_SOFTMAX: tl.constexpr, ACC: tl.constexpr, M_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_C_BLOCKS).to(tl.int64)
    c = ((pid % NUM_C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m = tl.arange(0, M_PAD).to(tl.int64)
    mask = (m < M)[:, None] & (c < C)[None, :]
    grad = tl.load(dheads_ptr + b * sd_b + m[:, None] * sd_m + c[None, :] * sd_c, mask=mask, other=0.0).to(ACC)
    grad += tl.load(dfused_ptr + b * sf_b + c * sf_c, mask=c < C, other=0.0).to(ACC)[None, :]
    if LOG_SOFTMAX:  # through heads = h - logsumexp_m(h): grad_h = grad - softmax * sum_m grad
        heads = tl.load(heads_ptr + b * sh_b + m[:, None] * sh_m + c[None, :] * sh_c, mask=mask, other=0.0).to(ACC)
        grad = grad - tl.exp(heads) * tl.sum(tl.where(mask, grad, 0.0), 0)[None, :]
    g = tl.load(g_ptr + b * sg_b + m[:, None] * sg_m + c[None, :] * sg_c, mask=mask, other=0.0).to(ACC)
    a = tl.load(gate_ptr + b * sa_b + m[:, None] * sa_m + c[None, :] * sa_c, mask=mask, other=0.0).to(ACC)
    gate = 1.0 / (1.0 + tl.exp(-a))
    offset = (b * M + m[:, None]) * C + c[None, :]  # outputs are contiguous [B, M, C]
    tl.store(dg_ptr + offset, _common.round_to(grad * gate, dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offset, _common.round_to(grad * g * gate * (1 - gate), dgate_ptr.dtype.element_ty), mask=mask)


def _blocks(M, C):
    m_pad = _common.next_pow2(M)
    # An eighth of a full tile per program (128 channels x 4 heads on a GPU): a B = 256 call is
    # 1024 programs instead of 256, spread over every SM; each still reads its inputs once.
    block_c = _common.block_for(C, m_pad * 8)
    return m_pad, block_c, triton.cdiv(C, block_c)


def dan_head_fusion_triton(g, gate_logits):
    # The guard of direct torch.ops calls (the public function has checked already), as the
    # compiled kernels' C++ checks.
    _checks.dan_head_fusion(g, gate_logits)
    _common.check_launch(OP, g=g, gate_logits=gate_logits)
    _common.check_dtype(OP, "g", g, DTYPES)
    B, M, C = g.shape
    fused = g.new_empty(B, C)
    heads = g.new_empty(B, M, C)
    m_pad, block_c, num_c_blocks = _blocks(M, C)
    _dan_head_fusion_kernel[(B * num_c_blocks,)](
        g, gate_logits, fused, heads, M, C, num_c_blocks,
        *g.stride(), *gate_logits.stride(), *fused.stride(), *heads.stride(),
        LOG_SOFTMAX=M > 1, ACC=_common.acc_dtype(g.dtype), M_PAD=m_pad, BLOCK_C=block_c,
    )
    return fused, heads


def dan_head_fusion_backward_triton(grad_fused, grad_heads, g, gate_logits, heads):
    _common.check_launch(OP + "_backward", grad_fused=grad_fused, grad_heads=grad_heads, g=g,
                         gate_logits=gate_logits, heads=heads)
    _common.check_dtype(OP + "_backward", "g", g, DTYPES)
    B, M, C = g.shape
    for name, t, shape in (("grad_fused", grad_fused, (B, C)), ("grad_heads", grad_heads, (B, M, C)),
                           ("gate_logits", gate_logits, (B, M, C)), ("heads", heads, (B, M, C))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{OP}_backward_triton: {name} must have shape {shape}, got {tuple(t.shape)}")
    grad_g = g.new_empty(B, M, C)
    grad_gate = gate_logits.new_empty(B, M, C)
    m_pad, block_c, num_c_blocks = _blocks(M, C)
    _dan_head_fusion_backward_kernel[(B * num_c_blocks,)](
        grad_fused, grad_heads, g, gate_logits, heads, grad_g, grad_gate, M, C, num_c_blocks,
        *grad_fused.stride(), *grad_heads.stride(), *g.stride(), *gate_logits.stride(), *heads.stride(),
        LOG_SOFTMAX=M > 1, ACC=_common.acc_dtype(g.dtype), M_PAD=m_pad, BLOCK_C=block_c,
    )
    return grad_g, grad_gate


_common.register({OP: dan_head_fusion_triton, OP + "_backward": dan_head_fusion_backward_triton})
