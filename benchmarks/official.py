"""The official formulations, written as the papers' code writes them: the
"eager" baseline every benchmark row is compared with.

They differ from `apkernels.reference` on purpose: the reference is the semantics the kernels are
tested against (stable tie order, fp32 accumulation); these are the operations the official
repositories run (APViT: scores, `torch.topk(sorted=False)`, a sort of the kept indices and a
gather, the full N x N attention logits for the token scores; DAN: a Python loop over the heads
that materialises `x * s`, an average pool, sigmoid gating, `log_softmax` and a sum), in the input
dtype, as they run in the official training code.

The model classes (`OfficialAPViT`, `OfficialDAN`) are small official-style modules with the
architectures of APViT and DAN (random weights), used by `benchmarks.model_bench` as the eager
baseline of the model rows.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import import_models

# --------------------------------------------------------------------------------------- ops


def patch_pool(x: torch.Tensor, keep: int, pos: torch.Tensor | None = None):
    """APViT attentive patch pooling, official style: (tokens [B, keep, C], index [B, keep])."""
    B, C, H, W = x.shape
    scores = torch.abs(x).sum(dim=1).flatten(1)  # sum_abs, in x's dtype
    index = torch.topk(scores, keep, dim=-1, sorted=False).indices
    index = index.sort(dim=-1).values
    tokens = x.flatten(2).transpose(1, 2)
    if pos is not None:
        tokens = tokens + pos.reshape(1, H * W, C)
    tokens = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, C))
    return tokens, index


def token_pool(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep: int, scale: float):
    """APViT attentive token pooling, official style: the full pre-softmax logits [B, h, N, N] are
    formed, their CLS row (CLS column excluded) summed over heads, top-k'd, sorted and gathered."""
    logits = (q @ k.transpose(-2, -1)) * scale
    scores = logits[:, :, 0, 1:].sum(dim=1)
    top = torch.topk(scores, keep, dim=-1, sorted=False).indices
    top = top.sort(dim=-1).values + 1
    index = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
    tokens = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return tokens, index


def dan_spatial_pool(x: torch.Tensor, z: torch.Tensor):
    """DAN spatial attention + GAP, official style: per head s = sum_c relu(z), sa = x * s
    materialised [B, C, H, W], adaptive average pool -> g [B, M, C]."""
    heads = []
    for m in range(z.shape[1]):
        s = torch.relu(z[:, m]).sum(dim=1, keepdim=True)
        sa = x * s
        heads.append(F.adaptive_avg_pool2d(sa, 1).flatten(1))
    return torch.stack(heads, dim=1)


def dan_head_fusion(g: torch.Tensor, gate_logits: torch.Tensor):
    """DAN channel gating + AFN fusion, official style: per-head g * sigmoid(a), stacked,
    log_softmax over the heads, summed: (fused [B, C], heads [B, M, C])."""
    heads = [g[:, m] * torch.sigmoid(gate_logits[:, m]) for m in range(g.shape[1])]
    heads = torch.stack(heads).permute(1, 0, 2)
    if heads.shape[1] > 1:
        heads = F.log_softmax(heads, dim=1)
    return heads.sum(dim=1), heads


# ------------------------------------------------------------------------------------ models


class _OfficialBlock(nn.Module):
    """ViT block with the official attentive token pooling between attention and MLP."""

    def __init__(self, dim: int, heads: int, keep_rate: float):
        super().__init__()
        self.heads, self.scale, self.keep_rate = heads, (dim // heads) ** -0.5, keep_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * self.scale  # the full N x N matrix, as officially
        a = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(a)
        n = N - 1
        keep = max(int(n * self.keep_rate), 1)
        if self.keep_rate < 1 and keep < n:
            top = torch.topk(logits[:, :, 0, 1:].sum(dim=1), keep, dim=-1, sorted=False).indices
            top = top.sort(dim=-1).values + 1
            index = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
            x = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, C))
        return x + self.mlp(self.norm2(x))


class OfficialAPViT(nn.Module):
    """APViT, official style: IR-50 stages 1-3, 1x1 projection, top-k patch pooling
    (`keep_patches`; all 196 keeps every patch), 8 ViT blocks with token pooling at `keep_rates`.
    The keyword arguments are those of `models.APViT` (smaller values make the smoke-test model)."""

    def __init__(
        self,
        num_classes: int = 7,
        keep_patches: int = 160,
        keep_rates=(1, 1, 1, 1, 0.9, 0.9, 0.9, 0.9),
        *,
        embed_dim: int = 768,
        num_heads: int = 8,
        backbone_units=(3, 4, 14),
        input_size: int = 112,
    ):
        super().__init__()
        num_patches = (input_size // 8) ** 2  # three stride-2 stages
        dim, heads = embed_dim, num_heads
        self.keep_patches = keep_patches
        IR50 = import_models("ir50").IR50  # the backbone is the same plain PyTorch in both formulations

        self.backbone = IR50(backbone_units)
        self.proj = nn.Conv2d(256, dim, 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_pos_embed = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[_OfficialBlock(dim, heads, r) for r in keep_rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, images):
        f = self.proj(self.backbone(images))  # [B, 768, 14, 14]
        if self.keep_patches < f.shape[2] * f.shape[3]:
            tokens, _ = patch_pool(f, self.keep_patches, self.patch_pos_embed)
        else:
            tokens = f.flatten(2).transpose(1, 2) + self.patch_pos_embed
        cls = (self.cls_token + self.cls_pos_embed).expand(tokens.shape[0], -1, -1)
        x = self.blocks(torch.cat([cls, tokens], dim=1))
        return self.fc(self.norm(x)[:, 0])


class _CrossAttentionHead(nn.Module):
    """One DAN head, official style: spatial attention then channel attention."""

    def __init__(self, channels: int = 512):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(channels, 256, 1), nn.BatchNorm2d(256))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(256, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(256, channels, (1, 3), padding=(0, 1)), nn.BatchNorm2d(channels))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(256, channels, (3, 1), padding=(1, 0)), nn.BatchNorm2d(channels))
        self.attention = nn.Sequential(
            nn.Linear(channels, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32, channels), nn.Sigmoid()
        )

    def forward(self, x):
        y = self.conv1x1(x)
        z = self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y)
        s = torch.relu(z).sum(dim=1, keepdim=True)
        sa = x * s  # materialised [B, 512, 7, 7]
        g = F.adaptive_avg_pool2d(sa, 1).flatten(1)
        return g * self.attention(g)


class OfficialDAN(nn.Module):
    """DAN, official style: ResNet-18 features, a Python loop over `heads` cross
    attention heads, log_softmax fusion, fc + BatchNorm1d. Returns (out, features, heads)."""

    def __init__(self, num_classes: int = 7, heads: int = 4):
        super().__init__()
        from torchvision.models import resnet18

        self.features = nn.Sequential(*list(resnet18(weights=None).children())[:-2])
        self.heads = nn.ModuleList([_CrossAttentionHead() for _ in range(heads)])
        self.fc = nn.Linear(512, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, images):
        x = self.features(images)
        heads = torch.stack([head(x) for head in self.heads]).permute(1, 0, 2)
        if heads.shape[1] > 1:
            heads = F.log_softmax(heads, dim=1)
        return self.bn(self.fc(heads.sum(dim=1))), x, heads
