"""DAN: ResNet-18 features -> multi-head cross attention -> fusion -> fc + BatchNorm1d.

The M cross-attention heads run batched in ``apkernels.nn.MultiHeadCrossAttention`` (its own
parameter layout); ``official_state_dict`` / ``load_official_state_dict`` convert from and to the
official per-head checkpoint layout (``features.*``, ``cat_head{m}.*``, ``fc.*``, ``bn.*``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn

from apkernels import BACKENDS
from apkernels.nn import MultiHeadCrossAttention

from .checkpoint import LoadReport, compare_state, copy_state, unwrap_state_dict
from .classes import default_classes

IMAGE_MEAN = (0.485, 0.456, 0.406)  # 0-1 scale
IMAGE_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
FEATURE_CHANNELS = 512
# torchvision ResNet-18 children -> index in `features` (avgpool and fc are not used).
RESNET_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


class DAN(nn.Module):
    """Distract your Attention Network.

    Args:
        num_classes: outputs (7 for RAF-DB and AffectNet-7, 8 for AffectNet-8).
        num_heads: M cross-attention heads (4).
        backend: "auto" (fastest kernels), "reference", or an apkernels backend name.
        classes: class names in output order (default: DAN's order for 7 or 8 classes).

    forward(images [B, 3, 224, 224]) -> (logits [B, num_classes], features [B, 512, 7, 7],
    heads [B, M, 512]) exactly as the official code: heads are log-softmaxed over the heads when
    M > 1 and logits = bn(fc(heads.sum(1))). Other input sizes work (features [B, 512, H/32, W/32]).
    """

    def __init__(self, num_classes: int = 7, num_heads: int = 4, backend: str = "auto", *, classes=None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"DAN: backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"DAN: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes, self.num_heads, self.backend = num_classes, num_heads, backend
        self.input_size, self.image_mean, self.image_std = INPUT_SIZE, IMAGE_MEAN, IMAGE_STD
        self.classes = tuple(classes) if classes is not None else default_classes("dan", num_classes)
        if len(self.classes) != num_classes:
            raise ValueError(f"DAN: classes must name {num_classes} classes, got {len(self.classes)}")
        resnet = torchvision.models.resnet18(weights=None)
        self.features = nn.Sequential(*list(resnet.children())[:-2])
        self.cross_attention = MultiHeadCrossAttention(FEATURE_CHANNELS, num_heads, backend=backend)
        self.fc = nn.Linear(FEATURE_CHANNELS, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"DAN: images must be [B, 3, H, W] (224 x 224 for the released models), got {got}")

    def forward(self, images: torch.Tensor):
        self._check_images(images)
        features = self.features(images)
        fused, heads = self.cross_attention(features)
        logits = self.bn(self.fc(fused))
        return logits, features, heads

    def spatial_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Each head's spatial attention map [B, M, H/32, W/32] (sum over channels of ReLU of its
        branch sum), for attention overlays."""
        self._check_images(images)
        return self.cross_attention.spatial_attention(self.features(images))

    def fuse_for_inference(self) -> "DAN":
        """Fold the heads' BatchNorms into their convolutions (eval mode only); see
        MultiHeadCrossAttention.fuse_for_inference. The state dicts are unchanged."""
        self.cross_attention.fuse_for_inference()
        return self

    # ---- checkpoints -------------------------------------------------------------------------
    def official_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The official checkpoint layout, in its order: features.*, cat_head{m}.*, fc.*, bn.*."""
        out = OrderedDict()
        for key, value in self.features.state_dict(prefix="features.").items():
            out[key] = value.detach().clone()
        out.update(self.cross_attention.official_state_dict())
        for name in ("fc", "bn"):
            for key, value in getattr(self, name).state_dict(prefix=f"{name}.").items():
                out[key] = value.detach().clone()
        return out

    def load_official_state_dict(self, checkpoint, strict: bool = True) -> LoadReport:
        """Load an official DAN checkpoint (a path, ``{'model_state_dict': ...}`` or bare;
        ``module.`` prefixes stripped). With ``strict`` any missing, unexpected or mis-shaped key
        raises ValueError listing them, before anything is copied."""
        state = unwrap_state_dict(checkpoint)
        heads = {k: v for k, v in state.items() if k.startswith("cat_head")}
        rest = {k: v for k, v in state.items() if not k.startswith("cat_head")}
        report = compare_state(self, rest, "DAN official checkpoint", allow_missing=("cross_attention.",))
        expected_heads = self.cross_attention.official_state_dict()
        report.missing += [k for k in expected_heads if k not in heads]
        report.unexpected += [k for k in heads if k not in expected_heads]
        report.mismatched += [
            f"{k}: {tuple(v.shape)} -> {tuple(expected_heads[k].shape)}"
            for k, v in heads.items() if k in expected_heads and tuple(v.shape) != tuple(expected_heads[k].shape)
        ]
        report.fill_batch_counters(heads)
        if strict:
            report.raise_if_incomplete()
        elif report.mismatched:  # the heads' loader copies nothing on a mismatch: drop those keys
            bad = {m.split(":")[0] for m in report.mismatched}
            heads = {k: v for k, v in heads.items() if k not in bad}
        self.cross_attention.load_official_state_dict(heads, strict=False)
        copy_state(self, rest, report)
        report.loaded += [k for k in heads if k in expected_heads]
        return report

    def load_pretrained(self, resnet18=None, strict: bool = True) -> list:
        """Training initialisation: the MS-Celeb-1M ResNet-18 (``resnet18_msceleb.pth``,
        torchvision key names, bare or under ``'state_dict'``) into ``features``; its ``fc`` is
        unused. Returns one LoadReport per checkpoint given."""
        reports = []
        if resnet18 is not None:
            state, ignored = {}, []
            for key, value in unwrap_state_dict(resnet18).items():
                child, _, rest = key.partition(".")
                if child in RESNET_CHILDREN:
                    state[f"{RESNET_CHILDREN[child]}.{rest}"] = value
                elif child == "fc":
                    ignored.append(key)
                else:
                    state[key] = value  # reported as unexpected
            report = compare_state(self.features, state, "ResNet-18 (MS-Celeb-1M) -> features", ignored=ignored)
            if strict:
                report.raise_if_incomplete()
            copy_state(self.features, state, report)
            reports.append(report)
        return reports
