"""IR-50, the face-recognition ResNet of face.evoLVe, cut after its third stage.

Module names follow the official APViT checkpoint (``input_layer``, ``body.{stage}.{unit}`` with
``res_layer`` / ``shortcut_layer``) so its keys load as they are.
"""
from __future__ import annotations

import re

import torch
from torch import nn

# Units per stage of IR-50 and their widths; APViT uses the first three stages (output stride 8).
IR50_UNITS = (3, 4, 14, 3)
IR50_DEPTHS = (64, 128, 256, 512)


class BottleneckIR(nn.Module):
    """face.evoLVe's ``bottleneck_IR`` unit: BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN, plus a
    shortcut (a stride-only MaxPool2d(1) when the width is unchanged, else conv1x1 + BN)."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IR50(nn.Module):
    """The first ``len(units)`` stages of IR-50: [B, 3, 112, 112] -> [B, 256, 14, 14] by default.

    Args:
        units: IR units per stage (IR-50: 3, 4, 14; fewer only for small test models).
    """

    def __init__(self, units=IR50_UNITS[:3]):
        super().__init__()
        units = tuple(units)
        if not 1 <= len(units) <= 4 or any(u < 1 for u in units):
            raise ValueError(f"IR50: units must list 1 to 4 positive unit counts per stage, got {units}")
        self.units = units
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        stages, in_channels = [], 64
        for count, depth in zip(units, IR50_DEPTHS):
            blocks = [BottleneckIR(in_channels, depth, 2)] + [BottleneckIR(depth, depth, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = depth
        self.body = nn.Sequential(*stages)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_layer(x))


_FLAT_UNIT = re.compile(r"^body\.(\d+)\.(.*)$")


def face_evolve_to_staged(state: dict, units=IR50_UNITS[:3]) -> tuple[dict, list]:
    """Rename a face.evoLVe IR-50 state dict (units numbered flat, ``body.0`` .. ``body.23``) to
    ``body.{stage}.{unit}`` by the unit counts (3, 4, 14, 3). Keys of stages beyond `units` and of
    the output layer are returned separately as ignored."""
    boundaries, start = [], 0
    for count in IR50_UNITS:
        boundaries.append((start, start + count))
        start += count
    renamed, ignored = {}, []
    for key, value in state.items():
        match = _FLAT_UNIT.match(key)
        if match is None:
            if key.startswith("output_layer."):
                ignored.append(key)
            else:
                renamed[key] = value
            continue
        flat, rest = int(match.group(1)), match.group(2)
        stage = next((s for s, (lo, hi) in enumerate(boundaries) if lo <= flat < hi), None)
        if stage is None or stage >= len(units) or flat - boundaries[stage][0] >= units[stage]:
            ignored.append(key)
            continue
        renamed[f"body.{stage}.{flat - boundaries[stage][0]}.{rest}"] = value
    return renamed, ignored
