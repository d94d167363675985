"""The papers' training recipes, as the official training code runs them (APViT: `configs/apvit/RAF.py`
through mmcls / mmcv; DAN: `rafdb.py`, `affectnet.py`): transforms, sampler, loss settings, optimiser,
schedule, clipping, and the one optimiser step `models.train` takes per batch. `paper_recipe(model,
dataset)` gives the defaults `models.train` uses; several fields can be overridden from the command
line. docs/workflows.md lists every detail and where (and by how much) we differ.
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
    clip_grad_norm: float | None = None  # max global L2 norm of the gradients (None: no clipping)
    sampler: str = "shuffle"  # "shuffle" | "repeat_factor" | "balanced"
    repeat_thr: float = 0.15
    affinity_centres: int | None = None  # DAN's affinity-loss centres (None: one per class)
    zero_head: bool = False  # start the classifier head at zero (mmcls LinearClsHead.init_weights)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["no_decay"] = list(self.no_decay)
        return d


# DAN's rafdb.py builds `AffinityLoss(device)` with the class's default num_class=8 although RAF-DB
# has 7 classes: the official run has an 8th centre, which only enters the spread term (and decays).
DAN_RAFDB_AFFINITY_CENTRES = 8


def paper_recipe(model: str, dataset: str) -> Recipe:
    """The official recipe for `model` on `dataset` (APViT's RAF-DB recipe serves every dataset;
    DAN has its own AffectNet variant; DAN's RAF-DB recipe serves the image-folder datasets too).

    APViT: the config asks for no weight decay on `.vit.pos_embed`, `.vit.cls_token`, ... through
    mmcv's paramwise custom_keys, but mmcv matches the keys against names without a leading dot
    (`vit.cls_token`), so none matches and the official run decays every parameter: so do we."""
    if model == "apvit":
        return Recipe(epochs=40, batch_size=128, lr=1e-3, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      no_decay=(), schedule="cosine", clip_grad_norm=10.0, sampler="repeat_factor",
                      repeat_thr=0.15, zero_head=True)
    if model == "dan":
        if dataset == "affectnet":
            return Recipe(epochs=40, batch_size=256, lr=1e-4, optimizer="adam", weight_decay=0.0,
                          schedule="exponential", gamma=0.6, sampler="balanced")
        return Recipe(epochs=40, batch_size=256, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
                      schedule="step", step_size=10, gamma=0.1, sampler="shuffle",
                      affinity_centres=DAN_RAFDB_AFFINITY_CENTRES if dataset == "rafdb" else None)
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


def train_transform(name: str, model: torch.nn.Module, dataset: str = "rafdb") -> T.Compose:
    """The official training augmentation of model `name` on `dataset` at the model's input size
    (DAN's affectnet.py augments differently from its rafdb.py)."""
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
    if name == "dan" and dataset == "affectnet":
        return T.Compose([
            T.Resize((size, size)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.RandomAffine(20, scale=(0.8, 1), translate=(0.2, 0.2))], p=0.7),
            T.ToTensor(),
            T.Normalize(mean, std),
            T.RandomErasing(),
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
    """The recipe's optimiser over the trainable parameters (the model's and the losses', e.g. DAN's
    affinity centres, which the official loops optimise with the same settings, weight decay
    included); parameters whose name contains a `no_decay` substring get no weight decay. SGD has
    no Nesterov and no dampening, Adam default betas / eps, as the official code."""
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


class CosineAnnealingByEpoch(torch.optim.lr_scheduler.LRScheduler):
    """mmcv's CosineAnnealing lr policy by epoch: before epoch e (0-based) every group's lr is
    eta_min + 0.5 * (base_lr - eta_min) * (cos(pi * e / total_epochs) + 1), computed in closed form
    (torch's CosineAnnealingLR uses a recursive update that drifts in the last digits)."""

    def __init__(self, optimizer, total_epochs: int, eta_min: float = 0.0, last_epoch: int = -1):
        if total_epochs < 1:
            raise ValueError(f"epochs: the cosine schedule needs at least 1 epoch, got {total_epochs}")
        self.total_epochs, self.eta_min = total_epochs, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [self.eta_min + 0.5 * (base - self.eta_min) * (math.cos(math.pi * (self.last_epoch / self.total_epochs)) + 1)
                for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def build_scheduler(recipe: Recipe, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's lr schedule, stepped once per epoch (after the epoch) as in every official loop."""
    if recipe.schedule == "cosine":
        return CosineAnnealingByEpoch(optimizer, total_epochs=max(recipe.epochs, 1))
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    if recipe.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=recipe.gamma)
    raise ValueError(f"schedule: expected cosine, step or exponential, got {recipe.schedule!r}")


def optimisation_step(recipe: Recipe, optimizer, scaler, parameters, loss: torch.Tensor) -> None:
    """One optimiser step on `loss`, in the official order (mmcv OptimizerHook; DAN's loops): zero
    the gradients, backward (loss-scaled under fp16), clip the global L2 norm of the gradients when
    the recipe clips, step. `parameters` are those the clipping measures (all trainable ones)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if recipe.clip_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], recipe.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def initialise(recipe: Recipe, model: torch.nn.Module) -> None:
    """The official starting point beyond the pretrained weights: APViT's mmcls LinearClsHead starts
    at zero (its init_weights), whatever the backbone was loaded with."""
    if recipe.zero_head:
        head = model.head.fc
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
