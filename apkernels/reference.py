"""Pure-PyTorch references: the official APViT / DAN formulations, op for op.

Every fast backend is tested against these. Scores and reductions of fp16/bf16 inputs are computed
in fp32 (as the kernels do); outputs come back in the input dtype. The forward functions are plain
differentiable PyTorch; the ``*_backward`` functions are the explicit gradients, used as the
fallback kernels of the backward ops when no compiled kernel exists.
"""
import torch

PATCH_SCORES = ("sum_abs", "sum", "sum_sq", "max", "max_abs")
TOKEN_SCORES = ("sum", "sum_abs", "max")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_topk(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions of the `keep` largest scores per row, in ascending order.

    Ties go to the lower position (a stable descending sort), NaN ranks above +inf (torch.sort's
    order, as torch.topk in the official code), -0.0 equals 0.0.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def patch_scores(x: torch.Tensor, score: str) -> torch.Tensor:
    """Per-position score of x [B, C, H, W], reduced over channels: [B, H*W] in the accumulation dtype."""
    f = x.flatten(2).to(accum_dtype(x.dtype))
    if score == "sum_abs":
        return f.abs().sum(1)
    if score == "sum":
        return f.sum(1)
    if score == "sum_sq":
        return f.square().sum(1)
    if score == "max":
        return f.amax(1)
    if score == "max_abs":
        return f.abs().amax(1)
    raise ValueError(f"score must be one of {PATCH_SCORES}, got {score!r}")


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [B, N, C], index [B, K] -> [B, K, C]."""
    return rows.gather(1, index.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))


def patch_pool(x: torch.Tensor, keep: int, pos: torch.Tensor | None = None, score: str = "sum_abs"):
    """APViT attentive patch pooling: (tokens [B, keep, C], index [B, keep])."""
    B, C, H, W = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    if pos is not None:
        tokens = tokens + pos.reshape(1, H * W, C)
    with torch.no_grad():
        index = select_topk(patch_scores(x.detach(), score), keep)
    return gather_rows(tokens, index), index


def token_scores(q: torch.Tensor, k: torch.Tensor, scale: float, score: str) -> torch.Tensor:
    """Scores of tokens 1..N-1 from the CLS-query row of the pre-softmax logits: [B, N-1]."""
    acc = accum_dtype(q.dtype)
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(acc), k[:, :, 1:].to(acc)) * scale
    if score == "sum":
        return logits.sum(1)
    if score == "sum_abs":
        return logits.abs().sum(1)
    if score == "max":
        return logits.amax(1)
    raise ValueError(f"score must be one of {TOKEN_SCORES}, got {score!r}")


def token_pool(x, q, k, keep: int, scale: float, score: str = "sum"):
    """APViT attentive token pooling: (tokens [B, keep+1, C], index [B, keep+1])."""
    with torch.no_grad():
        top = select_topk(token_scores(q.detach(), k.detach(), scale, score), keep) + 1
        index = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
    return gather_rows(x, index), index


def check_pool_index(index: torch.Tensor, num_rows: int) -> None:
    """pool_backward's index values must be rows of the output: in [0, num_rows) (one host sync on
    CUDA tensors; an out-of-range row must fail loudly rather than write out of bounds)."""
    if index.numel() and bool(((index < 0) | (index >= num_rows)).any()):
        bad = index[(index < 0) | (index >= num_rows)][0].item()
        raise RuntimeError(f"pool_backward: index must be in [0, {num_rows}) (num_rows), got {bad}")


def pool_backward(grad_tokens: torch.Tensor, index: torch.Tensor, num_rows: int, reduce_batch: bool):
    """Gradient of a row gather: grad_rows [B, num_rows, C] = 0, then grad_rows[b, index[b, j]] +=
    grad_tokens[b, j] for j ascending (a repeated index accumulates, in the accumulation dtype,
    rounded once); with reduce_batch also grad_rows summed over the batch, else an empty [0]."""
    check_pool_index(index, num_rows)
    B, K, C = grad_tokens.shape
    acc = accum_dtype(grad_tokens.dtype)
    # The j-th entry's rank among the earlier entries with the same row: each pass below writes
    # rows that are distinct within the pass, so the sum runs in ascending j with no write races.
    same = index.unsqueeze(2) == index.unsqueeze(1)  # [B, K, K]
    rank = same.tril(-1).sum(2)
    passes = int(rank.max()) + 1 if rank.numel() else 0
    # One spare row (num_rows) takes the entries of other passes.
    rows = grad_tokens.new_zeros(B, num_rows + 1, C, dtype=acc)
    values = grad_tokens.to(acc)
    for r in range(passes):
        target = torch.where(rank == r, index, num_rows).unsqueeze(-1).expand(-1, -1, C)
        if r == 0:
            rows.scatter_(1, target, values)  # a copy: exact, -0.0 kept
        else:
            rows.scatter_add_(1, target, values)
    grad_rows = rows[:, :num_rows].to(grad_tokens.dtype).contiguous()
    if reduce_batch:
        grad_sum = grad_rows.sum(0, dtype=acc).to(grad_rows.dtype)
    else:
        grad_sum = grad_tokens.new_empty(0)
    return grad_rows, grad_sum


def dan_spatial_attention(z: torch.Tensor) -> torch.Tensor:
    """DAN's spatial attention map per head: s = sum over channels of relu(z): [B, M, H, W]."""
    return z.relu().sum(2)


def dan_spatial_pool(x: torch.Tensor, z: torch.Tensor):
    """Official formulation: sa = x * s materialised per head, then global average pooled.

    Returns (g [B, M, C], s [B, M, H*W]): s, the attention maps in the accumulation dtype (fp32,
    fp64 for fp64), is what the backward reads instead of recomputing it from z.
    """
    acc = accum_dtype(x.dtype)
    s = dan_spatial_attention(z.to(acc))
    sa = x.to(acc).unsqueeze(1) * s.unsqueeze(2)
    return sa.mean((3, 4)).to(x.dtype), s.detach().flatten(2)


def dan_spatial_pool_backward(grad_g, x, z, s):
    """Gradients of g with respect to x and z, given the forward's attention maps s [B, M, H*W]."""
    acc = accum_dtype(x.dtype)
    g, x32, z32, s = grad_g.to(acc), x.to(acc).flatten(2), z.to(acc).flatten(3), s.to(acc)
    P = x32.shape[-1]
    grad_x = torch.einsum("bmc,bmp->bcp", g, s) / P
    t = torch.einsum("bmc,bcp->bmp", g, x32) / P
    grad_z = torch.where(z32 <= 0, 0.0, t.unsqueeze(2))  # torch.relu's gradient (a select: NaN z passes t)
    return grad_x.reshape(x.shape).to(x.dtype), grad_z.reshape(z.shape).to(z.dtype)


def dan_head_fusion(g: torch.Tensor, gate_logits: torch.Tensor):
    """DAN channel gating + AFN fusion: (fused [B, C], heads [B, M, C])."""
    acc = accum_dtype(g.dtype)
    heads = g.to(acc) * torch.sigmoid(gate_logits.to(acc))
    if heads.shape[1] > 1:
        heads = torch.log_softmax(heads, dim=1)
    return heads.sum(1).to(g.dtype), heads.to(g.dtype)


def dan_head_fusion_backward(grad_fused, grad_heads, g, gate_logits, heads):
    acc = accum_dtype(g.dtype)
    grad_h = grad_heads.to(acc) + grad_fused.to(acc).unsqueeze(1)
    if g.shape[1] > 1:
        grad_h = grad_h - heads.to(acc).exp() * grad_h.sum(1, keepdim=True)
    gate = torch.sigmoid(gate_logits.to(acc))
    grad_g = grad_h * gate
    grad_gate = grad_h * g.to(acc) * gate * (1 - gate)
    return grad_g.to(g.dtype), grad_gate.to(gate_logits.dtype)
