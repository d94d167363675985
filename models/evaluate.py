"""Evaluate an APViT or DAN checkpoint (ours or an official release) on a FER dataset split.

    python -m models.evaluate --model apvit --checkpoint APViT_RAF-3eeecf7d.pth \\
        --dataset rafdb --data-root data/RAF-DB/basic --json results/apvit_raf.json

Writes accuracy, balanced accuracy, per-class accuracy and the confusion matrix (rows = true class,
columns = predicted, in the model's class order) to the JSON, and the confusion matrix as a PNG next
to it (<json stem>_confusion.png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from torch.utils.data import DataLoader

from . import data as fer_data
from . import checkpoint, cli, metrics, plots, recipes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=cli.prog_name("models.evaluate"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_arguments(p, recipes.MODELS)
    p.add_argument("--dataset", required=True, choices=fer_data.DATASETS)
    p.add_argument("--data-root", required=True, metavar="DIR")
    p.add_argument("--split", default="test", help="default test (AffectNet: its val/ folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=cli.default_workers(),
                   help="data loading processes (default min(4, CPUs): %(default)s)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out (and list) images whose header does not open, instead of stopping")
    p.add_argument("--amp", default="none", choices=tuple(cli.AMP_DTYPES))
    p.add_argument("--json", default=None, metavar="OUT", help="write the metrics here (and the confusion PNG beside it)")
    return p.parse_args(argv)


def evaluate(args) -> dict:
    device = cli.resolve_device(args.device)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    model = checkpoint.load_for_inference(args.model, args.checkpoint, device, classes, json.loads(args.model_kwargs),
                                      args.input_size)
    classes = list(model.classes)
    dataset = fer_data.build_dataset(args.dataset, args.data_root, args.split, classes,
                                     recipes.eval_transform(model))
    for path, problem in fer_data.check_images(dataset, args.skip_bad_images):
        print(f"left out {path}: {problem}", file=sys.stderr)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    cm, loss_sum, n = metrics.run_evaluation(model, loader, device, len(classes), args.amp)
    result = {
        "model": args.model, "checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset,
        "data_root": os.path.abspath(args.data_root), "split": args.split, "loss": loss_sum / max(n, 1),
        **metrics.metrics_from_confusion(cm, classes),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        png = os.path.splitext(args.json)[0] + "_confusion.png"
        plots.plot_confusion(cm, classes, png, title=f"{args.model} on {args.dataset} {args.split}: "
                                                      f"acc {result['accuracy']:.4f}")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = evaluate(args)
    print(f"{args.model} {os.path.basename(args.checkpoint)} on {args.dataset} {args.split} "
          f"({result['num_samples']} images): accuracy {result['accuracy']:.4f}, "
          f"balanced accuracy {result['balanced_accuracy']:.4f}", file=sys.stderr)
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:>10}: " + ("-" if acc is None else f"{acc:.4f}") + f" ({result['support'][name]})",
              file=sys.stderr)
    return result


def command() -> None:
    """The `apkernels-evaluate` command."""
    cli.run_cli(main, cli.prog_name("models.evaluate"))


if __name__ == "__main__":
    command()
