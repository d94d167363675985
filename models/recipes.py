"""The papers' training recipes (APViT's, and DAN's including its AffectNet variant): transforms,
sampler, optimiser, schedule. `paper_recipe(model, dataset)` gives the defaults `models.train` uses;
every field can be overridden from the command line.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

MODELS = ("apvit", "dan")

@dataclass
class Recipe:
    epochs: int
    batch_size: int  # global (split across DDP processes)
    lr: float
    optimizer: str  # "sgd" | "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    no_decay: tuple = ()  # parameter-name substrings trained without weight decay
    schedule: str = "cosine"  # "cosine" (to 0 over the epochs) | "step" | "exponential", stepped per epoch
    step_size: int = 10
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    sampler: str = "shuffle"  # "shuffle" | "repeat_factor" | "balanced"
    repeat_thr: float = 0.15

    def to_dict(self) -> dict:
        d = asdict(self)
        d["no_decay"] = list(self.no_decay)
        return d


def paper_recipe(model: str, dataset: str) -> Recipe:
    """The official recipe for `model` on `dataset` (APViT's RAF-DB recipe serves every dataset;
    DAN has its own AffectNet variant)."""
    if model == "apvit":
        return Recipe(epochs=40, batch_size=128, lr=1e-3, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      no_decay=("pos_embed", "cls_token"), schedule="cosine", clip_grad_norm=10.0,
                      sampler="repeat_factor", repeat_thr=0.15)
    if model == "dan":
        if dataset == "affectnet":
            return Recipe(epochs=40, batch_size=256, lr=1e-4, optimizer="adam", weight_decay=0.0,
                          schedule="exponential", gamma=0.6, sampler="balanced")
        return Recipe(epochs=40, batch_size=256, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
                      schedule="step", step_size=10, gamma=0.1, sampler="shuffle")
    raise ValueError(f"model: expected one of {MODELS}, got {model!r}")


def override(recipe: Recipe, **values) -> Recipe:
    """`recipe` with the non-None `values` replaced (command-line overrides)."""
    return replace(recipe, **{k: v for k, v in values.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------

def eval_transform(model: torch.nn.Module) -> T.Compose:
    """The test transform: resize to the model's input size, normalise with its statistics
    (`model.input_size`, `model.image_mean`, `model.image_std`). `models.predict` uses exactly this."""
    size = model.input_size
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(model.image_mean, model.image_std)])


def train_transform(name: str, model: torch.nn.Module) -> T.Compose:
    """The paper's training augmentation of model `name` at the model's input size."""
    size, mean, std = model.input_size, model.image_mean, model.image_std
    if name == "apvit":
        return T.Compose([
            T.RandomApply([T.RandomRotation(6)], p=0.5),
            T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(1.0, 1.0)),
            T.RandomHorizontalFlip(0.5),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.ToTensor(),
            T.Normalize(mean, std),
            T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value="random"),
        ])
    if name == "dan":
        return T.Compose([
            T.Resize((size, size)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.RandomRotation(20), T.RandomCrop(size, padding=32)], p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
            T.RandomErasing(scale=(0.02, 0.25)),
        ])
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------

def repeat_factor_indices(targets, thr: float) -> list[int]:
    """mmcls ClassBalancedDataset: each image repeated ceil(max(1, sqrt(thr / f_c))) times, f_c the
    fraction of images of its class."""
    n = len(targets)
    counts = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    repeats = {c: math.ceil(max(1.0, math.sqrt(thr / (k / n)))) for c, k in counts.items()}
    return [i for i, t in enumerate(targets) for _ in range(repeats[t])]


class FERSampler(DistributedSampler):
    """DistributedSampler over the recipe's epoch index list: "shuffle" (a permutation),
    "repeat_factor" (class-balanced repeats, shuffled) or "balanced" (DAN's ImbalancedDatasetSampler:
    len(dataset) draws with replacement, weight 1 / class count). Each epoch's list depends only on
    (seed, epoch), so every rank draws the same list and takes its share, and a resumed run redraws
    the same one. Works unchanged with one process (num_replicas=1)."""

    def __init__(self, dataset, mode: str = "shuffle", *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, repeat_thr: float = 0.15):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        targets = list(dataset.targets)
        self.mode = mode
        if mode == "shuffle":
            self.base = torch.arange(len(targets))
        elif mode == "repeat_factor":
            self.base = torch.tensor(repeat_factor_indices(targets, repeat_thr))
        elif mode == "balanced":
            counts = torch.bincount(torch.tensor(targets))
            self.weights = 1.0 / counts[torch.tensor(targets)].double()
            self.base = torch.arange(len(targets))
        else:
            raise ValueError(f"sampler: expected shuffle, repeat_factor or balanced, got {mode!r}")
        self.num_samples = math.ceil(len(self.base) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if self.mode == "balanced":
            order = torch.multinomial(self.weights, len(self.base), replacement=True, generator=g)
        else:
            order = self.base[torch.randperm(len(self.base), generator=g)]
        order = order.tolist()
        order += order[: self.total_size - len(order)]  # pad so every rank gets the same count
        return iter(order[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


# ---------------------------------------------------------------------------------------------
# optimiser and schedule
# ---------------------------------------------------------------------------------------------

def build_optimizer(recipe: Recipe, named_parameters) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if any(s in name for s in recipe.no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr)
    raise ValueError(f"optimizer: expected sgd or adam, got {recipe.optimizer!r}")


def build_scheduler(recipe: Recipe, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(recipe.epochs, 1), eta_min=0.0)
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    if recipe.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=recipe.gamma)
    raise ValueError(f"schedule: expected cosine, step or exponential, got {recipe.schedule!r}")
