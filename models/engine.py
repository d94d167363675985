"""Shared machinery of the FER command lines: building models with their class lists, the training
loss of each model, evaluation and metrics, checkpoints (ours and the official ones), RNG state,
distributed set-up, plots.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import tempfile
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

CHECKPOINT_FORMAT = "apkernels-fer"
CHECKPOINT_VERSION = 1
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# models and class lists
# ---------------------------------------------------------------------------------------------

def model_classes(model: str, dataset: str | None, num_classes: int) -> list[str]:
    """The output order a model trained on `dataset` uses: APViT always its own order (SPEC 1.5);
    DAN RAF-DB's label order on RAF-DB and AffectNet's folder order on AffectNet (SPEC 2.5)."""
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


def add_checkpoint_arguments(parser, models: Sequence[str]) -> None:
    """The options evaluate and predict share: which model, which checkpoint, and how to rebuild an
    official checkpoint's model (our checkpoints record all of it)."""
    parser.add_argument("--model", required=True, choices=models)
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a models.train checkpoint or an official APViT / DAN release (format detected)")
    parser.add_argument("--classes", default=None, metavar="A,B,...",
                        help="output order of an official checkpoint, if not the release's (ours carry theirs)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="constructor arguments for an official checkpoint's model (ours record theirs)")
    parser.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                        help="image side for an official checkpoint's model (default the paper's; ours record theirs)")
    parser.add_argument("--device", default="auto")


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_cli(main, prog: str) -> None:
    """Run a tool's main(): a bad argument or a missing file ends with one readable line (exit 2)
    instead of a traceback."""
    import sys

    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------

def _dist_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_distributed(device: torch.device):
    """(rank, world size, device) from torchrun's environment; initialises the process group
    (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, world, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ---------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors / plain containers (readable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, then rename: an interrupted save never
    leaves a truncated checkpoint behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_checkpoint_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint: {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def is_our_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_for_inference(model_name: str, checkpoint: str, device: torch.device,
                       classes: Sequence[str] | None = None, model_kwargs: dict | None = None,
                       input_size: int | None = None) -> torch.nn.Module:
    """A model in eval mode from either a `models.train` checkpoint or an official release (APViT
    mmcv `{'state_dict', 'meta'}`, DAN `{'model_state_dict'}`), format detected from the contents.

    The class list comes from our checkpoint, else `classes`, else the official file's
    `meta.CLASSES`, else the release's order (DAN: AffectNet order when the file has 8 outputs or its
    name says affecnet/affectnet, RAF-DB order otherwise). `model_kwargs` and `input_size` build an
    official file's model (ours records its own)."""
    obj = load_checkpoint_file(checkpoint)
    if is_our_checkpoint(obj):
        if obj["model"] != model_name:
            raise ValueError(f"model: {checkpoint} holds a {obj['model']!r} model, but --model is {model_name!r}")
        ckpt_classes = list(obj["classes"])
        if classes is not None and list(classes) != ckpt_classes:
            raise ValueError(f"classes: the checkpoint's classes are {ckpt_classes}, got {list(classes)}")
        model = build_model(model_name, ckpt_classes, obj.get("model_kwargs"), obj.get("input_size"))
        missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint} does not fit the {model_name} model:\n"
                             f"  missing keys: {list(missing)}\n  unexpected keys: {list(unexpected)}")
    else:
        from .checkpoint import checkpoint_meta, unwrap_state_dict

        state = unwrap_state_dict(obj)
        head = "head.fc.weight" if model_name == "apvit" else "fc.weight"
        if head not in state:
            other = "dan" if model_name == "apvit" else "apvit"
            hint = (f" (it looks like a {other} checkpoint)"
                    if ("fc.weight" if other == "dan" else "head.fc.weight") in state else "")
            raise ValueError(f"checkpoint: {checkpoint} is neither a models.train checkpoint nor an official "
                             f"{model_name} checkpoint: no {head!r} key{hint}")
        num_classes = state[head].shape[0]
        if classes is None:
            meta_classes = checkpoint_meta(obj).get("CLASSES")
            if meta_classes:
                classes = [str(c) for c in meta_classes]
            else:
                name = os.path.basename(checkpoint).lower()
                dataset = "affectnet" if (model_name == "dan" and (num_classes == 8 or "affe" in name)) else None
                classes = model_classes(model_name, dataset, num_classes)
        if len(classes) != num_classes:
            raise ValueError(f"classes: {len(classes)} names given but the checkpoint has {num_classes} outputs")
        model_kwargs = dict(model_kwargs or {})
        if input_size is not None and model_name == "apvit":
            model_kwargs["input_size"] = input_size
        model = build_model(model_name, classes, model_kwargs, input_size)
        model.load_official_state_dict(obj, strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# plots and logs
# ---------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without importing pyplot (slow, and global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_curves(history: list[dict], out_dir: str) -> None:
    """curves.png: loss (left) and accuracy (right) per epoch, from the metrics.jsonl records."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = _figure(11, 4)
    panels = (("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc", "test_balanced_acc")))
    for ax, (ylabel, keys) in zip(fig.subplots(1, 2), panels):
        for key in keys:
            values = [h.get(key) for h in history]
            ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=90)


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
