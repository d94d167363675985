"""Train APViT or DAN for facial expression recognition.

    python -m models.train --model dan --dataset rafdb --data-root data/RAF-DB/basic --out runs/dan_raf
    torchrun --nproc_per_node 4 -m models.train --model apvit --dataset rafdb --data-root ... --out ...

The defaults are the papers' recipes (`models/recipes.py`). Every epoch RUN_DIR gets a
line in metrics.jsonl, curves.png (loss and accuracy), and last.pt (written atomically); best.pt is the
epoch with the best test accuracy. `--resume RUN_DIR/last.pt` continues the run exactly; `--resume auto`
continues from RUN_DIR/last.pt when there is one, else starts fresh: under `torchrun --max-restarts N`
a group restarted after a process died resumes by itself, losing at most the epoch it was in.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import data as fer_data
from . import checkpoint, cli, distributed, metrics, modeling, plots, recipes, rng


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=cli.prog_name("models.train"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=recipes.MODELS)
    p.add_argument("--dataset", required=True, choices=fer_data.DATASETS,
                   help="rafdb: RAF-DB basic (EmoLabel/list_patition_label.txt, Image/aligned/); affectnet: "
                        "DAN's layout (train/, val/ with folders 0..7); folder: <root>/{train,test}/<class>/*")
    p.add_argument("--data-root", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, metrics, plots)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="7 or 8 for AffectNet (7 drops contempt; default 8); RAF-DB has 7; folder: the class folders")
    p.add_argument("--recipe", default="paper", choices=("paper",),
                   help="hyper-parameter defaults (the paper's official recipe; the options below override it)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (split across processes)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--sampler", default=None, choices=("shuffle", "repeat_factor", "balanced"))
    p.add_argument("--workers", type=int, default=cli.default_workers(),
                   help="data loading processes per training process (default min(4, CPUs): %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun: one GPU per local rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="none", choices=tuple(cli.AMP_DTYPES), help="autocast dtype (fp16 adds loss scaling)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a last.pt / best.pt of this tool; 'auto': from RUN_DIR/last.pt when it "
                        "exists (same model, dataset and recipe, else an error), else start fresh (a RUN_DIR "
                        "holding other files still needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an existing --out, replacing its run (without it, an existing run "
                        "directory is refused)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images whose header does not open (listed in RUN_DIR/skipped_images.txt); "
                        "without it, an unreadable image stops the run before training")
    p.add_argument("--pretrained", nargs="+", default=None, metavar="[NAME=]PATH",
                   help="initial weights for the model's load_pretrained, NAME=PATH for a keyword (APViT: "
                        "ir50=backbone_ir50_ms1m_epoch120.pth vit=vit_small_p16_224-15ec54c9.pth; DAN: "
                        "resnet18_msceleb.pth); the paper recipes start from them")
    p.add_argument("--pretrained-partial", action="store_true",
                   help="load what matches from --pretrained and report the rest (strict=False), instead of "
                        "refusing a file with missing, unexpected or mis-shaped keys")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON",
                   help="extra keyword arguments of the model constructor, e.g. a smaller model for smoke tests")
    p.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="image side the model sees (default the paper's: APViT 112, DAN 224); smaller runs faster")
    p.add_argument("--eval-split", default="test", help="split evaluated after every epoch (AffectNet: val)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (the schedule still spans --epochs; resume later)")
    args = p.parse_args(argv)
    try:
        args.model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        p.error(f"--model-kwargs: not JSON: {exc}")
    if not isinstance(args.model_kwargs, dict):
        p.error("--model-kwargs: expected a JSON object")
    return args


def resolve_classes(args) -> list[str]:
    """The output order of the model to train (APViT: its own order; DAN: RAF-DB's label order, or
    AffectNet's folder order); image folders: the canonical order when every folder is an emotion
    the default list has, else the folder names."""
    if args.dataset == "rafdb":
        return modeling.model_classes(args.model, "rafdb", args.num_classes or 7)
    if args.dataset == "affectnet":
        return modeling.model_classes(args.model, "affectnet", args.num_classes or 8)
    names = fer_data.folder_class_names(args.data_root, "train")
    if not names:
        raise ValueError(f"data-root: no class folders in {os.path.join(args.data_root, 'train')}")
    if args.num_classes is not None and args.num_classes != len(names):
        raise ValueError(f"num-classes: {args.num_classes} given but {len(names)} class folders found: {names}")
    canonical = [fer_data.canonical_class(n) for n in names]
    if all(canonical):
        default = modeling.model_classes(args.model, None, len(names))
        if sorted(canonical) == sorted(default):
            return default
        return sorted(canonical)
    return names


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed every RNG from (seed, epoch, rank): an epoch's augmentation does not depend on what ran
    before it, so a resumed run (and every DDP rank) replays exactly."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _save(path: str, step: modeling.TrainStep, optimizer, scheduler, scaler, epoch: int, best_acc: float,
          classes, args, recipe) -> None:
    model_state = step.model.state_dict()
    loss_state = {k: v for k, v in step.state_dict().items() if not k.startswith("model.")}
    checkpoint.atomic_save({
        "format": checkpoint.CHECKPOINT_FORMAT,
        "version": checkpoint.CHECKPOINT_VERSION,
        "model": args.model,
        "classes": list(classes),
        "model_kwargs": dict(args.model_kwargs),
        "input_size": int(step.model.input_size),
        "state_dict": model_state,
        "loss_state_dict": loss_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng.rng_state(),
        "epoch": epoch,
        "best_acc": best_acc,
        "config": {
            "model": args.model, "dataset": args.dataset, "data_root": os.path.abspath(args.data_root),
            "num_classes": len(classes), "recipe": recipe.to_dict(), "seed": args.seed, "amp": args.amp,
            "eval_split": args.eval_split,
        },
    }, path)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        tqdm.write(msg, file=sys.stderr)


# Test hook: "RANK:EPOCH:BATCH:MARKER" makes process RANK SIGKILL itself at that (0-based) epoch
# and batch, once (MARKER records that it happened), as a crashed or OOM-killed worker would die.
KILL_HOOK_ENV = "MODELS_TRAIN_KILL_AT"


def _kill_hook(rank: int, epoch: int, batch: int) -> None:
    spec = os.environ.get(KILL_HOOK_ENV)
    if not spec:
        return
    at_rank, at_epoch, at_batch, marker = spec.split(":", 3)
    if (rank, epoch, batch) == (int(at_rank), int(at_epoch), int(at_batch)) and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_resume(args) -> str | None:
    """The checkpoint to continue from: --resume's path, RUN_DIR/last.pt for --resume auto when it
    exists (every process of a restarted torchrun group finds the same one), else None."""
    if args.resume != "auto":
        return args.resume
    last = os.path.join(args.out, "last.pt")
    return last if os.path.isfile(last) else None


def train_epoch(trainer, step: modeling.TrainStep, loader, optimizer, scaler, recipe: recipes.Recipe,
                device: torch.device, amp: str = "none", desc: str = "train", show_progress: bool = True,
                before_batch=None) -> torch.Tensor:
    """One epoch of the recipe's training steps over `loader` (the scheduler steps after it):
    `trainer` is `step` or its DDP wrapper; `before_batch(index)` runs before each batch. Returns
    float64 sums over the samples: loss, correct, count, affinity, partition."""
    step.train()
    sums = torch.zeros(5, dtype=torch.float64)
    bar = tqdm(loader, desc=desc, disable=not show_progress, leave=False)
    for batch, (images, labels) in enumerate(bar):
        if before_batch is not None:
            before_batch(batch)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with cli.autocast(device, amp):
            logits, loss, parts = trainer(images, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {loss.item()} (lower --lr?)")
        recipes.optimisation_step(recipe, optimizer, scaler, step.parameters(), loss)
        n = labels.numel()
        sums += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n,
                              float(parts.get("affinity", 0.0)) * n, float(parts.get("partition", 0.0)) * n],
                             dtype=torch.float64)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}")
    return sums


def train(args, rank: int, world: int, device: torch.device) -> dict:
    args.resume = resolve_resume(args)
    if not args.resume:
        cli.claim_run_dir(args.out, args.overwrite)
    resume = checkpoint.load_checkpoint_file(args.resume) if args.resume else None
    if resume is not None:
        if not checkpoint.is_our_checkpoint(resume):
            raise ValueError(f"resume: {args.resume} is not a models.train checkpoint")
        cfg = resume["config"]
        for key in ("model", "dataset"):
            if getattr(args, key) != cfg[key]:
                raise ValueError(f"{key}: the checkpoint was trained with {key} {cfg[key]!r}, got {getattr(args, key)!r}")
        # An exact continuation needs the recipe the run started with (the schedule's length included).
        recipe = recipes.Recipe(**{**cfg["recipe"], "no_decay": tuple(cfg["recipe"]["no_decay"])})
        for key in ("epochs", "batch_size", "lr", "weight_decay", "sampler"):
            given = getattr(args, key)
            if given is not None and given != getattr(recipe, key):
                raise ValueError(f"{key.replace('_', '-')}: the resumed run uses {getattr(recipe, key)!r}, got "
                                 f"{given!r}; drop the option, or start a new run to change the recipe")
        classes = list(resume["classes"])
        args.model_kwargs = dict(resume.get("model_kwargs") or {})
        args.seed, args.amp, args.eval_split = cfg["seed"], cfg["amp"], cfg.get("eval_split", args.eval_split)
    else:
        recipe = recipes.override(recipes.paper_recipe(args.model, args.dataset), epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                  sampler=args.sampler)
        classes = resolve_classes(args)
        if args.input_size is not None:
            if args.model == "apvit":  # APViT's patch grid follows its input size
                args.model_kwargs["input_size"] = args.input_size
    if resume is not None:
        args.input_size = resume.get("input_size")
    if recipe.batch_size % world:
        raise ValueError(f"batch-size: {recipe.batch_size} is not divisible by the {world} processes")
    per_process_batch = recipe.batch_size // world

    rng.seed_everything(args.seed)
    model = modeling.build_model(args.model, classes, args.model_kwargs, args.input_size)
    train_set = fer_data.build_dataset(args.dataset, args.data_root, "train", classes,
                                       recipes.train_transform(args.model, model, args.dataset))
    test_set = fer_data.build_dataset(args.dataset, args.data_root, args.eval_split, classes,
                                      recipes.eval_transform(model))
    bad_images = []
    for dataset in (train_set, test_set):
        bad_images += fer_data.check_images(dataset, args.skip_bad_images, show_progress=rank == 0)
    if bad_images:
        _log(rank, f"left out {len(bad_images)} unreadable image(s) (--skip-bad-images), listed in "
                   f"{os.path.join(args.out, 'skipped_images.txt')}")
    if args.pretrained and resume is None:
        positional, named = modeling.parse_pretrained(args.pretrained)
        reports = model.load_pretrained(*positional, **named, strict=not args.pretrained_partial)
        for report in reports if isinstance(reports, (list, tuple)) else [reports]:
            if report is not None:
                _log(rank, str(report))
    if resume is None:
        recipes.initialise(recipe, model)
    step = modeling.TrainStep(args.model, model, recipe.affinity_centres).to(device)
    optimizer = recipes.build_optimizer(recipe, step.named_parameters())
    scheduler = recipes.build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, best_acc = 0, -1.0
    if resume is not None:
        step.load_state_dict({**{f"model.{k}": v for k, v in resume["state_dict"].items()},
                              **resume["loss_state_dict"]})
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        rng.set_rng_state(resume["rng"])
        start_epoch, best_acc = int(resume["epoch"]), float(resume["best_acc"])
        if start_epoch >= recipe.epochs:
            _log(rank, f"{args.resume}: the run is complete (all {recipe.epochs} epochs trained, best "
                       f"{args.eval_split} accuracy {best_acc:.4f}); nothing to resume")
            history = metrics.read_jsonl(os.path.join(args.out, "metrics.jsonl"))
            return {"best_acc": best_acc, "history": history, "classes": classes, "complete": True}
    trainer = step
    if world > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = recipes.FERSampler(train_set, recipe.sampler, num_replicas=world, rank=rank, seed=args.seed,
                                 repeat_thr=recipe.repeat_thr)
    # BatchNorm cannot train on a batch of one sample: drop a last batch of exactly one.
    drop_last = len(sampler) % per_process_batch == 1
    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, batch_size=per_process_batch, sampler=sampler, drop_last=drop_last, **loader_kw)
    test_shard = Subset(test_set, range(rank, len(test_set), world)) if world > 1 else test_set
    test_loader = DataLoader(test_shard, batch_size=per_process_batch, shuffle=False, **loader_kw)

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if bad_images:
            cli.write_text(os.path.join(args.out, "skipped_images.txt"),
                              "".join(f"{path}\t{problem}\n" for path, problem in bad_images))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    history = [h for h in metrics.read_jsonl(metrics_path) if h["epoch"] <= start_epoch] if resume is not None else []
    _log(rank, f"{args.model} on {args.dataset}: {len(train_set)} train / {len(test_set)} {args.eval_split} images, "
               f"classes {classes}, {world} process(es) on {device}, epochs {start_epoch + 1}..{recipe.epochs}")

    epochs_run = 0
    for epoch in range(start_epoch, recipe.epochs):
        if args.stop_after is not None and epochs_run >= args.stop_after:
            break
        t0 = time.time()
        sampler.set_epoch(epoch)
        _seed_epoch(args.seed, epoch, rank)
        lr = optimizer.param_groups[0]["lr"]
        sums = train_epoch(trainer, step, train_loader, optimizer, scaler, recipe, device, args.amp,
                           desc=f"epoch {epoch + 1}/{recipe.epochs}", show_progress=rank == 0,
                           before_batch=lambda batch: _kill_hook(rank, epoch, batch))
        if world > 1:
            sums = sums.to(distributed._dist_device())
            dist.all_reduce(sums)
            sums = sums.cpu()
            for buf in step.buffers():  # evaluate (and save) rank 0's BatchNorm statistics everywhere
                dist.broadcast(buf, 0)
        scheduler.step()

        cm, test_loss_sum, n_test = metrics.run_evaluation(step.model, test_loader, device, len(classes), args.amp,
                                                          desc="evaluate", show_progress=rank == 0)
        scores = metrics.metrics_from_confusion(cm, classes)
        record = {
            "epoch": epoch + 1, "lr": lr,
            "train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2]),
            "test_loss": test_loss_sum / max(n_test, 1), "test_acc": scores["accuracy"],
            "test_balanced_acc": scores["balanced_accuracy"], "time_s": round(time.time() - t0, 3),
        }
        if args.model == "dan":
            record["train_affinity"] = float(sums[3] / sums[2])
            record["train_partition"] = float(sums[4] / sums[2])
        improved = record["test_acc"] > best_acc
        best_acc = max(best_acc, record["test_acc"])
        history.append(record)
        if rank == 0:
            metrics.write_jsonl(metrics_path, history)
            plots.plot_curves(history, args.out)
            _save(os.path.join(args.out, "last.pt"), step, optimizer, scheduler, scaler, epoch + 1, best_acc,
                  classes, args, recipe)
            if improved:
                _save(os.path.join(args.out, "best.pt"), step, optimizer, scheduler, scaler, epoch + 1, best_acc,
                      classes, args, recipe)
        _log(rank, f"epoch {epoch + 1}/{recipe.epochs}: train loss {record['train_loss']:.4f} "
                   f"acc {record['train_acc']:.4f} | {args.eval_split} loss {record['test_loss']:.4f} "
                   f"acc {record['test_acc']:.4f} bacc {record['test_balanced_acc']:.4f}"
                   + (" (best)" if improved else ""))
        epochs_run += 1
        if world > 1:
            dist.barrier()
    return {"best_acc": best_acc, "history": history, "classes": classes}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    rank, world, device = distributed.setup_distributed(device)
    try:
        return train(args, rank, world, device)
    finally:
        distributed.cleanup_distributed()


def command() -> None:
    """The `apkernels-train` command."""
    cli.run_cli(main, cli.prog_name("models.train"))


if __name__ == "__main__":
    command()
