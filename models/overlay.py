"""Attention overlays for `models.predict --attention-out`.

APViT: which of the 14x14 patches Attentive Patch Pooling kept, and which of those are still tokens
after the last Attentive Token Pooling. DAN: each head's spatial attention map over the 7x7 grid.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PANEL = 224  # display size of each panel
LABEL_BACKGROUND = (0, 0, 0, 190)  # translucent black box behind panel titles: readable on any image


def _label(panel: Image.Image, xy: tuple, text: str, fill=(255, 255, 0)) -> None:
    """`text` at `xy` on a dark box, so a caption stays readable over bright or yellow faces."""
    box = ImageDraw.Draw(panel).textbbox(xy, text)
    pad = 2
    overlay = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle([box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad], fill=LABEL_BACKGROUND)
    panel.paste(Image.alpha_composite(panel.convert("RGBA"), overlay).convert("RGB"))
    ImageDraw.Draw(panel).text(xy, text, fill=fill)


def _mask_panel(image: Image.Image, kept: torch.Tensor, grid: tuple, title: str) -> Image.Image:
    """`image` with the grid cells not in `kept` (row-major positions) darkened."""
    base = image.convert("RGB").resize((PANEL, PANEL), Image.BILINEAR)
    rows, cols = grid
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[kept.long().cpu()] = True
    shade = Image.new("RGB", base.size, (0, 0, 0))
    alpha = Image.new("L", base.size, 0)
    draw_alpha = ImageDraw.Draw(alpha)
    ch, cw = PANEL / rows, PANEL / cols
    for p in range(rows * cols):
        if not mask[p]:
            r, c = divmod(p, cols)
            draw_alpha.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], fill=170)
    panel = Image.composite(shade, base, alpha)
    _label(panel, (4, 4), title)
    return panel


def _side_by_side(panels: Sequence[Image.Image], caption: str = "") -> Image.Image:
    top = 16 if caption else 0
    out = Image.new("RGB", (PANEL * len(panels), PANEL + top), (255, 255, 255))
    for i, panel in enumerate(panels):
        out.paste(panel, (i * PANEL, top))
    if caption:
        ImageDraw.Draw(out).text((4, 2), caption, fill=(0, 0, 0))
    return out


def apvit_overlay(image: Image.Image, patch_index: torch.Tensor, final_positions: torch.Tensor,
                  grid: tuple = (14, 14), caption: str = "") -> Image.Image:
    """Two panels: the patches kept by patch pooling (patch_index [K]) and the patch tokens left
    after the last token pooling (final_positions [n], `PoolingIndices.kept_positions()` of one image)."""
    total = grid[0] * grid[1]
    return _side_by_side([
        _mask_panel(image, patch_index, grid, f"patch pooling: {patch_index.numel()}/{total}"),
        _mask_panel(image, final_positions, grid, f"after token pooling: {final_positions.numel()}"),
    ], caption)


def _colormap(values: torch.Tensor) -> Image.Image:
    """[H, W] values in 0..1 -> RGB image through matplotlib's jet colormap."""
    from matplotlib import colormaps

    rgb = colormaps["jet"](values.clamp(0, 1).numpy())[..., :3]
    return Image.fromarray((rgb * 255).astype("uint8"))


def dan_overlay(image: Image.Image, maps: torch.Tensor, caption: str = "") -> Image.Image:
    """One panel per head: the head's [h, w] spatial map, upsampled and blended over the image
    (each map scaled to its own 0..max range)."""
    base = image.convert("RGB").resize((PANEL, PANEL), Image.BILINEAR)
    panels = []
    for m, amap in enumerate(maps.float().cpu()):
        up = F.interpolate(amap[None, None], size=(PANEL, PANEL), mode="bilinear", align_corners=False)[0, 0]
        up = up - up.min()
        up = up / up.max().clamp_min(1e-12)
        panel = Image.blend(base, _colormap(up), 0.45)
        _label(panel, (4, 4), f"head {m}", fill=(255, 255, 255))
        panels.append(panel)
    return _side_by_side(panels, caption)
