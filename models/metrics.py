"""Evaluation and its metrics: confusion matrix, accuracies, the metrics.jsonl records."""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .cli import autocast
from .distributed import _dist_device
from .modeling import logits_of


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = true class, columns = predicted class."""
    idx = targets.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor, classes: Sequence[str]) -> dict:
    """accuracy, balanced accuracy (mean recall over the classes that occur, as sklearn's
    balanced_accuracy_score), per-class accuracy (None for a class without samples)."""
    cm = cm.to(torch.int64)
    total = int(cm.sum())
    support = cm.sum(dim=1)
    correct = cm.diagonal()
    per_class = {}
    recalls = []
    for i, name in enumerate(classes):
        if int(support[i]) == 0:
            per_class[name] = None
        else:
            r = int(correct[i]) / int(support[i])
            per_class[name] = r
            recalls.append(r)
    return {
        "accuracy": int(correct.sum()) / total if total else float("nan"),
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else float("nan"),
        "per_class_accuracy": per_class,
        "support": {name: int(support[i]) for i, name in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "num_samples": total,
    }


@torch.no_grad()
def run_evaluation(model: torch.nn.Module, loader, device: torch.device, num_classes: int, amp: str = "none",
                   desc: str = "evaluate", show_progress: bool = True):
    """(confusion matrix, summed cross-entropy, sample count) over `loader`; summed over the DDP
    processes when a process group is up (each process evaluates its own shard)."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not show_progress):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = logits_of(model(images))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double().cpu()
        cm += confusion_matrix(labels, logits.argmax(dim=1), num_classes)
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        stats = torch.cat([cm.flatten().double(), loss_sum.reshape(1)]).to(_dist_device())
        dist.all_reduce(stats)
        stats = stats.cpu()
        cm = stats[:-1].round().long().reshape(num_classes, num_classes)
        loss_sum = stats[-1]
    return cm, float(loss_sum), int(cm.sum())


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
