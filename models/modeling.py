"""Building the FER models with their class lists, and the training step (model + its losses)."""
from __future__ import annotations

import inspect
import os
from typing import Sequence

import torch
import torch.nn.functional as F


def model_classes(model: str, dataset: str | None, num_classes: int) -> list[str]:
    """The output order a model trained on `dataset` uses: APViT always its own order;
    DAN RAF-DB's label order on RAF-DB and AffectNet's folder order on AffectNet."""
    from . import classes as C

    if model == "dan" and dataset == "affectnet":
        if num_classes not in (7, 8):
            raise ValueError(f"num-classes: AffectNet has 7 or 8 classes, got {num_classes}")
        return list(C.DAN_AFFECTNET7_CLASSES if num_classes == 7 else C.DAN_AFFECTNET8_CLASSES)
    return list(C.default_classes(model, num_classes))


def build_model(name: str, classes: Sequence[str], model_kwargs: dict | None = None,
                input_size: int | None = None) -> torch.nn.Module:
    """`models.build_model(name, num_classes, **model_kwargs)` labelled with `classes`. `input_size`
    records the image side the workflows feed a model that does not fix its own (DAN)."""
    from . import MODELS
    from . import build_model as _build

    kwargs = dict(model_kwargs or {})
    if name in MODELS and "classes" in inspect.signature(MODELS[name]).parameters:
        kwargs["classes"] = tuple(classes)
    model = _build(name, num_classes=len(classes), **kwargs)
    if list(getattr(model, "classes", [])) != list(classes):
        model.classes = tuple(classes)
    if input_size is not None and input_size != model.input_size:
        if name in MODELS and "input_size" in inspect.signature(MODELS[name]).parameters:
            # APViT's patch grid is fixed at construction: the size must come through model_kwargs.
            raise ValueError(f"input-size: the {name} model is built for {model.input_size}, got {input_size}")
        model.input_size = int(input_size)  # DAN is fully convolutional: any size runs
    return model


def parse_pretrained(items: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """["a.pth", "vit=b.pth"] -> (["a.pth"], {"vit": "b.pth"}) for model.load_pretrained."""
    positional, named = [], {}
    for item in items:
        key, sep, path = item.partition("=")
        if sep and key.isidentifier() and not os.path.exists(item):
            named[key] = path
        else:
            positional.append(item)
    for path in positional + list(named.values()):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained: file not found: {path}")
    return positional, named


def logits_of(output) -> torch.Tensor:
    """APViT returns logits, DAN (logits, features, heads)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class TrainStep(torch.nn.Module):
    """Model + its training losses in one module, so DistributedDataParallel also synchronises the
    gradients of loss parameters (DAN's affinity centres). forward -> (logits, loss, {part: value}).
    `affinity_centres`: DAN's number of affinity-loss centres (default one per class; the official
    RAF-DB run has 8, see models.recipes)."""

    def __init__(self, name: str, model: torch.nn.Module, affinity_centres: int | None = None):
        super().__init__()
        self.name = name
        self.model = model
        if name == "dan":
            from . import AffinityLoss, PartitionLoss

            feat_dim = getattr(model, "feat_dim", 512)
            centres = len(model.classes) if affinity_centres is None else affinity_centres
            if centres < len(model.classes):
                raise ValueError(f"affinity_centres: need at least one centre per class ({len(model.classes)}), "
                                 f"got {centres}")
            self.affinity = AffinityLoss(centres, feat_dim)
            self.partition = PartitionLoss()

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        out = self.model(images)
        logits = logits_of(out)
        ce = F.cross_entropy(logits.float(), labels)
        if self.name != "dan":
            return logits, ce, {"ce": ce.detach()}
        _, features, heads = out
        affinity = self.affinity(features.float(), labels)
        partition = self.partition(heads.float())
        loss = ce + affinity + partition
        return logits, loss, {"ce": ce.detach(), "affinity": affinity.detach(), "partition": partition.detach()}
