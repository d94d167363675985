"""Predict facial expressions with an APViT or DAN checkpoint (ours or an official release).

    python -m models.predict --model dan --checkpoint rafdb_epoch21_acc0.897_bacc0.8275.pth \\
        faces/ extra.jpg --json predictions.json --attention-out overlays/

Every face in each photo is detected and aligned to the model's input (APViT: 5-landmark similarity
transform onto its 112 x 112 template; DAN: square crop at 224 x 224), then classified. One JSON
object per face, {"path", "face", "box", "detector_score", "landmarks", "label", "probabilities":
{class: p}}, is printed (one per line) in input order (a directory expands to its images, sorted,
recursively); a photo without a face gives {"path", ..., "label": null, "status": "no face found"}.
--json writes them as one list; --annotate DIR writes each photo with boxes, labels and attention.
--no-detect: the inputs are face crops; one object {"path", "label", "probabilities"} per image,
through exactly the evaluation transform, in batches.
--attention-out DIR writes a PNG per image (per face when detecting): APViT the patches kept by patch
pooling and the tokens left after the last token pooling; DAN each head's spatial attention map.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import data as fer_data
from . import checkpoint, cli, modeling, overlay, recipes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=cli.prog_name("models.predict"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_arguments(p, recipes.MODELS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write the predictions here as a JSON list")
    p.add_argument("--attention-out", default=None, metavar="DIR", help="write attention overlay PNGs here")
    faces_group = p.add_argument_group("faces in photos (default: detect and align every face)")
    faces_group.add_argument("--no-detect", action="store_true",
                             help="the inputs are face crops: classify each whole image (no detection)")
    faces_group.add_argument("--detector", default="mtcnn", choices=("mtcnn", "haar"),
                             help="mtcnn (facenet-pytorch, 5 landmarks; default) or haar (OpenCV < 5, boxes only)")
    faces_group.add_argument("--detector-threshold", type=float, default=0.9, metavar="P",
                             help="MTCNN's minimum face probability (default 0.9)")
    faces_group.add_argument("--min-face-size", type=int, default=20, metavar="PIXELS",
                             help="smallest face side to detect (default 20)")
    faces_group.add_argument("--annotate", default=None, metavar="DIR",
                             help="write each photo with boxes, labels and the attention over each face here")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    return p.parse_args(argv)


def expand_inputs(inputs) -> list[str]:
    """Files as given; directories replaced by their images (recursive, sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                           if f.lower().endswith(fer_data.IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"inputs: no images in directory {item}")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"inputs: no such file or directory: {item}")
    return paths


class _Images(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(fer_data.load_image(self.paths[i])), i


def _overlay_name(index: int, path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{index:05d}_{stem}_attention.png"  # the index keeps equal stems from different folders apart


def load_model(args):
    """(device, model in eval mode) from the checkpoint options."""
    device = cli.resolve_device(args.device)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    model = checkpoint.load_for_inference(args.model, args.checkpoint, device, classes, json.loads(args.model_kwargs),
                                          args.input_size)
    return device, model


@torch.no_grad()
def predict(args) -> list[dict]:
    if not args.no_detect:
        from .face_predict import predict_faces

        return predict_faces(args)
    device, model = load_model(args)
    classes = list(model.classes)
    paths = expand_inputs(args.inputs)
    loader = DataLoader(_Images(paths, recipes.eval_transform(model)), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.workers)
    if args.attention_out:
        os.makedirs(args.attention_out, exist_ok=True)
    results = []
    for images, indices in tqdm(loader, desc="predict", leave=False):
        images = images.to(device)
        if args.model == "apvit" and args.attention_out:
            logits, pooling = model(images, return_pooling=True)
        else:
            logits = modeling.logits_of(model(images))
        probs = torch.softmax(logits.float(), dim=1).cpu()
        for row, i in zip(probs, indices.tolist()):
            results.append({"path": paths[i], "label": classes[int(row.argmax())],
                            "probabilities": {c: float(p) for c, p in zip(classes, row)}})
        if args.attention_out:
            if args.model == "apvit":
                kept = pooling.kept_positions().cpu()
                patches = pooling.patch_index.cpu()
            else:
                maps = model.spatial_attention(images).cpu()
            for j, i in enumerate(indices.tolist()):
                image = fer_data.load_image(paths[i])
                caption = f"{os.path.basename(paths[i])}: {results[i]['label']}"
                if args.model == "apvit":
                    png = overlay.apvit_overlay(image, patches[j], kept[j], tuple(pooling.grid), caption)
                else:
                    png = overlay.dan_overlay(image, maps[j], caption)
                png.save(os.path.join(args.attention_out, _overlay_name(i, paths[i])))
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    results = predict(args)
    for r in results:
        print(json.dumps(r))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def command() -> None:
    """The `apkernels-predict` command."""
    cli.run_cli(main, cli.prog_name("models.predict"))


if __name__ == "__main__":
    command()
