"""APViT: IR-50 (3 stages) -> Attentive Patch Pooling -> ViT with Attentive Token Pooling.

Module and parameter names follow the official checkpoint (``extractor.*``, ``vit.*``,
``head.fc.*``), so ``model.state_dict()`` has exactly its 389 keys, in its order.

``backend`` chooses the apkernels backend of the pooling ops ("auto": the fastest; the token-pooling
kernel reads the CLS row of q and k straight out of the qkv tensor). ``attention`` chooses how the
attention is computed: "sdpa" through ``F.scaled_dot_product_attention`` (no N x N matrix), or
"explicit", the official formulation (logits -> softmax -> @ v). backend="reference" with
attention="explicit" is the official formulation throughout.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from apkernels import BACKENDS
from apkernels.nn import AttentivePatchPool, AttentiveTokenPool

from .checkpoint import LoadReport, checkpoint_meta, load_matching, read_checkpoint, unwrap_state_dict
from .classes import default_classes
from .ir50 import IR50, face_evolve_to_staged

APVIT_KEEP_RATES = (1, 1, 1, 1, 0.9, 0.9, 0.9, 0.9)
INPUT_SIZE = 112
BACKBONE_STRIDE = 8  # three stride-2 stages: 112 -> 14
# APViT normalises 0-255 images with mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375):
# the ImageNet statistics, given here on the 0-1 scale (as for DAN).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class PoolingIndices(NamedTuple):
    """Which positions APViT kept, for attention overlays.

    patch_index: [B, keep_patches] int64, the positions kept by patch pooling, row-major in the
        ``grid`` (14 x 14 for 112 x 112 input), ascending; token j (1-based after CLS) of the first
        block is grid position ``patch_index[:, j - 1]``.
    token_indices: one entry per block: None when the block dropped nothing, else [B, n_out] int64,
        the indices into that block's input tokens that it kept (0 is CLS, always first).
    grid: (H, W) of the patch grid.
    """

    patch_index: torch.Tensor
    token_indices: tuple
    grid: tuple

    def kept_positions(self, after_block: Optional[int] = None) -> torch.Tensor:
        """[B, n] grid positions of the patch tokens left after block `after_block` (default: the
        last, i.e. the tokens the classifier's CLS token attended to last), ascending."""
        positions = self.patch_index
        blocks = self.token_indices if after_block is None else self.token_indices[: after_block + 1]
        for index in blocks:
            if index is not None:
                # index counts CLS as 0: patch token i sits at index i, i.e. positions[:, i - 1].
                positions = positions.gather(1, index[:, 1:] - 1)
        return positions

    def kept_mask(self, after_block: Optional[int] = None) -> torch.Tensor:
        """[B, H, W] bool, True where a patch token survives after `after_block` (default: all blocks)."""
        positions = self.kept_positions(after_block)
        mask = torch.zeros(positions.shape[0], self.grid[0] * self.grid[1], dtype=torch.bool, device=positions.device)
        mask.scatter_(1, positions, True)
        return mask.view(-1, *self.grid)


ATTENTION_KINDS = ("sdpa", "explicit")


class Attention(nn.Module):
    """Multi-head self-attention (qkv without bias); returns the output and the q, k views that
    token pooling scores with (strided views of the qkv tensor, no copies)."""

    def __init__(self, dim: int, num_heads: int, attention: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attention = attention
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, head_dim] each, strided views
        if self.attention == "explicit":
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), q, k


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Transformer block with Attentive Token Pooling between the attention and MLP residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, keep_rate: float, token_score: str, backend: str,
                 attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.token_pool = AttentiveTokenPool(keep_rate, token_score, backend) if keep_rate < 1 else None

    def forward(self, x: torch.Tensor):
        out, q, k = self.attn(self.norm1(x))
        x = x + out
        index = None
        if self.token_pool is not None:
            x, index = self.token_pool(x, q, k, self.attn.scale)
        x = x + self.mlp(self.norm2(x))
        return x, index


class PoolingViT(nn.Module):
    """The ``vit`` part: 1x1 projection, patch pooling with position embedding, CLS, blocks, norm."""

    def __init__(self, in_channels, grid, embed_dim, num_heads, mlp_ratio, keep_patches, keep_rates,
                 patch_score, token_score, backend, attention):
        super().__init__()
        num_patches = grid[0] * grid[1]
        # Parameters first, in the official checkpoint's order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.projs = nn.ModuleList([nn.Conv2d(in_channels, embed_dim, 1)])
        self.patch_pool = AttentivePatchPool(keep_patches, patch_score, backend)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, token_score, backend, attention) for rate in keep_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grid = tuple(grid)

    def forward(self, features: torch.Tensor):
        f = self.projs[0](features)
        pos = self.patch_pos_embed
        if torch.is_autocast_enabled(f.device.type):
            # Under autocast f is already fp16/bf16: pool in that dtype (the kernels add pos in fp32
            # and round once) rather than promote the whole feature map to fp32 for one add.
            pos = pos.to(f.dtype)
        else:
            dtype = torch.promote_types(f.dtype, pos.dtype)
            f, pos = f.to(dtype), pos.to(dtype)
        tokens, patch_index = self.patch_pool(f, pos)
        cls = (self.cls_token + self.cls_pos_embed).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        token_indices = []
        for block in self.blocks:
            x, index = block(x)
            token_indices.append(index)
        return self.norm(x), patch_index, tuple(token_indices)


class ClsHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        return self.fc(cls_token)


class APViT(nn.Module):
    """Vision Transformer with Attentive Pooling (RAF-DB configuration by default).

    Args:
        num_classes: outputs of the linear head (7 for RAF-DB).
        keep_patches: K, positions kept by Attentive Patch Pooling out of the 14 x 14 grid (160).
        keep_rates: per block, the fraction of patch tokens kept by Attentive Token Pooling
            (1 = no pooling); its length is the number of blocks.
        patch_score / token_score: score reductions ("sum_abs" / "sum" in the paper).
        backend: the apkernels backend of the pooling ops: "auto" (the fastest), "cuda", "triton",
            "cpu" or "reference".
        attention: "sdpa" (F.scaled_dot_product_attention) or "explicit" (the official
            logits -> softmax -> @ v).
        embed_dim, num_heads, mlp_ratio, backbone_units: the paper's 768 / 8 / 3 / (3, 4, 14);
            smaller values only make small test models.
        classes: class names in output order (default: APViT's order for 7 or 8 classes).

    forward(images [B, 3, 112, 112]) -> logits [B, num_classes];
    forward(images, return_pooling=True) -> (logits, PoolingIndices).
    """

    def __init__(self, num_classes: int = 7, keep_patches: int = 160, keep_rates=APVIT_KEEP_RATES,
                 patch_score: str = "sum_abs", token_score: str = "sum", backend: str = "auto", *,
                 embed_dim: int = 768, num_heads: int = 8, mlp_ratio: float = 3.0,
                 backbone_units=(3, 4, 14), input_size: int = INPUT_SIZE, classes=None,
                 attention: str = "sdpa"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"APViT: backend must be one of {BACKENDS}, got {backend!r}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"APViT: attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if len(tuple(backbone_units)) != 3:
            raise ValueError(f"APViT: backbone_units must give the units of three IR-50 stages, got {backbone_units}")
        grid = (input_size // BACKBONE_STRIDE, input_size // BACKBONE_STRIDE)
        num_patches = grid[0] * grid[1]
        if isinstance(keep_patches, bool) or not isinstance(keep_patches, int) or not 1 <= keep_patches <= num_patches:
            raise ValueError(f"APViT: keep_patches must be an int in [1, {num_patches}] (the {grid} grid), got {keep_patches!r}")
        keep_rates = tuple(float(r) for r in keep_rates)
        if not keep_rates or any(not 0 < r <= 1 for r in keep_rates):
            raise ValueError(f"APViT: keep_rates must be a non-empty list of rates in (0, 1], got {keep_rates}")
        self.num_classes, self.keep_patches, self.keep_rates = num_classes, keep_patches, keep_rates
        self.backend, self.input_size = backend, input_size
        self.image_mean, self.image_std = IMAGE_MEAN, IMAGE_STD
        self.classes = tuple(classes) if classes is not None else default_classes("apvit", num_classes)
        if len(self.classes) != num_classes:
            raise ValueError(f"APViT: classes must name {num_classes} classes, got {len(self.classes)}")

        self.extractor = IR50(backbone_units)
        self.vit = PoolingViT(self.extractor.out_channels, grid, embed_dim, num_heads, mlp_ratio, keep_patches,
                              keep_rates, patch_score, token_score, backend, attention)
        self.head = ClsHead(embed_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm ViT initialisation for the transformer part; PyTorch defaults for the convolutions."""
        for p in (self.vit.cls_token, self.vit.patch_pos_embed, self.vit.cls_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in list(self.vit.blocks.modules()) + [self.head.fc]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def token_counts(self) -> list:
        """Tokens (CLS included) each block outputs: 161, 161, 161, 161, 145, 130, 117, 105 for
        the paper's configuration (ATP keeps max(int(n * rate), 1) of the n patch tokens)."""
        counts, n = [], self.keep_patches
        for block in self.vit.blocks:
            if block.token_pool is not None:
                n = min(n, block.token_pool.num_kept(n))
            counts.append(n + 1)
        return counts

    def forward(self, images: torch.Tensor, return_pooling: bool = False):
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"APViT: images must be [B, 3, {self.input_size}, {self.input_size}], got {tuple(images.shape)}"
            )
        x, patch_index, token_indices = self.vit(self.extractor(images))
        logits = self.head(x[:, 0])
        if return_pooling:
            return logits, PoolingIndices(patch_index, token_indices, self.vit.grid)
        return logits

    # ---- checkpoints -------------------------------------------------------------------------
    def official_state_dict(self) -> dict:
        """The state dict in the official checkpoint layout (the module names are the official ones)."""
        return self.state_dict()

    def load_official_state_dict(self, checkpoint, strict: bool = True) -> LoadReport:
        """Load an official APViT checkpoint (a path, ``{'state_dict': ...}`` or bare; ``module.``
        prefixes stripped). Takes the class list from ``meta.CLASSES`` when it has one."""
        checkpoint = read_checkpoint(checkpoint)  # read a file once, for the tensors and the meta
        state = unwrap_state_dict(checkpoint)
        report = load_matching(self, state, "APViT official checkpoint", strict)
        classes = checkpoint_meta(checkpoint).get("CLASSES")
        if classes is not None and len(classes) == self.num_classes:
            self.classes = tuple(classes)
        return report

    def load_pretrained(self, ir50=None, vit=None, strict: bool = True) -> list:
        """Training initialisation: the face.evoLVe IR-50 (``body.0`` .. ``body.23``
        flat; stage 4 and the output layer ignored) and/or timm's legacy ``vit_small_p16_224``
        (``pos_embed`` split into CLS / patch rows, the patch grid bilinearly resized when it
        differs; ``patch_embed`` and ``head`` dropped; ``vit.projs`` and ``head.fc`` stay as they
        are). Returns one LoadReport per checkpoint given."""
        reports = []
        if ir50 is not None:
            state, ignored = face_evolve_to_staged(unwrap_state_dict(ir50), self.extractor.units)
            reports.append(load_matching(self.extractor, state, "IR-50 (face.evoLVe) -> extractor", strict,
                                         ignored=ignored))
        if vit is not None:
            state, ignored = self._timm_vit_to_own(unwrap_state_dict(vit, keys=("state_dict", "model")))
            reports.append(load_matching(self.vit, state, "timm ViT -> vit", strict, allow_missing=("projs.",),
                                         ignored=ignored))
        return reports

    def _timm_vit_to_own(self, state: dict):
        own, ignored = {}, []
        for key, value in state.items():
            if key.startswith(("patch_embed.", "head.", "pre_logits.")):
                ignored.append(key)
            elif key == "pos_embed":
                if value.dim() != 3 or value.shape[0] != 1:
                    raise ValueError(f"timm ViT: pos_embed must be [1, 1 + grid, dim], got {tuple(value.shape)}")
                own["cls_pos_embed"] = value[:, :1]
                own["patch_pos_embed"] = resize_pos_embed(value[:, 1:], self.vit.grid)
            else:
                own[key] = value
        return own, ignored


def resize_pos_embed(pos: torch.Tensor, grid) -> torch.Tensor:
    """[1, G*G, C] patch position embeddings of a square grid -> [1, grid[0]*grid[1], C], bilinear
    (align_corners=False) when the grids differ."""
    n, channels = pos.shape[1], pos.shape[2]
    if n == grid[0] * grid[1]:
        return pos
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"timm ViT: pos_embed has {n} patch rows, not a square grid; cannot resize to {grid}")
    image = pos.reshape(1, side, side, channels).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(grid), mode="bilinear", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels).to(pos.dtype)
