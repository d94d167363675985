"""Plots of the workflows: training curves and confusion matrices (matplotlib, Agg canvas)."""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without importing pyplot (slow, and global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_curves(history: list[dict], out_dir: str):
    """curves.png: loss (left) and accuracy (right) per epoch, from the metrics.jsonl records."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = _figure(11, 4)
    panels = (("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc", "test_balanced_acc")))
    for ax, (ylabel, keys) in zip(fig.subplots(1, 2), panels):
        for key in keys:
            values = [h.get(key) for h in history]
            ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
        if len(epochs) <= 12:  # MaxNLocator falls back to fractional ticks below two epochs
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=90)
    return fig


def plot_confusion(cm, classes: Sequence[str], path: str, title: str = "") -> None:
    """Row-normalised confusion matrix with the counts written in the cells."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    rows = cm.sum(dim=1, keepdim=True).clamp_min(1)
    norm = (cm / rows).numpy()
    n = len(classes)
    fig = _figure(1.5 + 0.8 * n, 1.2 + 0.7 * n)
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
