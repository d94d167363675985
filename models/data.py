"""FER datasets: RAF-DB (official basic layout), AffectNet (DAN's converted layout), image folders.

Every dataset yields (image tensor, label) where the label indexes the MODEL's class list: the
datasets carry their own label order (RAF-DB 1..7 = Surprise, Fear, ...; AffectNet folders 0..7 =
Neutral, Happiness, ...) and are mapped by class NAME, because APViT and DAN order their outputs
differently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

DATASETS = ("rafdb", "affectnet", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Dataset label orders (what the files on disk mean), not model output orders.
RAF_LABELS = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")  # 1..7
AFFECTNET_LABELS = ("Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Contempt")  # 0..7

_ALIASES = {
    "surprise": "Surprise", "surprised": "Surprise",
    "fear": "Fear", "fearful": "Fear", "afraid": "Fear",
    "disgust": "Disgust", "disgusted": "Disgust",
    "happiness": "Happiness", "happy": "Happiness", "joy": "Happiness",
    "sadness": "Sadness", "sad": "Sadness",
    "anger": "Anger", "angry": "Anger",
    "neutral": "Neutral",
    "contempt": "Contempt",
}


def canonical_class(name: str) -> str | None:
    """The canonical emotion name for `name` ('happy' -> 'Happiness'), or None if it is not one."""
    return _ALIASES.get(str(name).strip().lower())


def class_mapping(dataset_labels: Sequence[str], model_classes: Sequence[str]) -> dict[int, int]:
    """Dataset label index -> model class index, matched by emotion name. Dataset labels the model
    does not have (Contempt for a 7-class model) are absent from the mapping (samples dropped)."""
    model_index = {}
    for i, name in enumerate(model_classes):
        key = canonical_class(name) or str(name)
        if key in model_index:
            raise ValueError(f"model classes: {name!r} appears twice in {list(model_classes)}")
        model_index[key] = i
    mapping = {}
    for j, name in enumerate(dataset_labels):
        key = canonical_class(name) or str(name)
        if key in model_index:
            mapping[j] = model_index[key]
    return mapping


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # index into the model's classes


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, upright: EXIF orientation applied, transparency composited on white, 16-bit and
    float greyscale scaled to 0-255 (PIL's convert("RGB") would clip them to white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:
            scale = 1.0 / 257.0 if img.mode.startswith("I;16") or (values.size and values.max() > 255) else 1.0
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """RGB PIL image (see `to_rgb`); a missing or unreadable file raises naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # forces the full decode, so corrupt data fails here
            return to_rgb(img)
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise RuntimeError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


class FERDataset(torch.utils.data.Dataset):
    """A list of (path, label) samples with a transform; `classes` is the model's class list."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable | None = None,
                 name: str = "dataset"):
        if len(samples) == 0:
            raise ValueError(f"{name}: no images found (empty split)")
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for s in self.samples:
            counts[s.label] += 1
        return counts

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.path)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label


def image_header_problem(path: str) -> str | None:
    """None when `path` opens as an image (header only: fast), else what is wrong with it."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        return f"{type(exc).__name__}: {exc}"
    if width <= 0 or height <= 0:
        return f"empty image ({width}x{height})"
    return None


def check_images(dataset: FERDataset, skip_bad: bool = False, show_progress: bool = True) -> list[tuple[str, str]]:
    """Open every image header of `dataset` before any work starts, so that a corrupt file fails at
    once instead of inside a DataLoader worker an epoch later. Returns the bad (path, problem) pairs;
    with `skip_bad` they are dropped from the dataset, otherwise a ValueError lists them."""
    from tqdm import tqdm

    bad = []
    for sample in tqdm(dataset.samples, desc=f"checking {dataset.name}", unit="img", leave=False,
                       disable=not show_progress, mininterval=1.0):
        problem = image_header_problem(sample.path)
        if problem is not None:
            bad.append((sample.path, problem))
    if bad and not skip_bad:
        shown = "; ".join(f"{path}: {problem}" for path, problem in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{dataset.name}: {len(bad)} unreadable image(s): {shown}{more} "
                         "(pass --skip-bad-images to leave them out)")
    if bad:
        bad_paths = {path for path, _ in bad}
        kept = [s for s in dataset.samples if s.path not in bad_paths]
        if not kept:
            raise ValueError(f"{dataset.name}: none of its {len(bad)} images is readable")
        dataset.samples = kept
    return bad


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory not found: {path}")


def rafdb_samples(root: str, split: str, classes: Sequence[str]) -> list[Sample]:
    """RAF-DB basic: EmoLabel/list_patition_label.txt (`train_00001.jpg 5`, split = name prefix),
    images Image/aligned/<stem>_aligned.jpg."""
    if split not in ("train", "test"):
        raise ValueError(f"split: RAF-DB has 'train' and 'test', got {split!r}")
    label_file = os.path.join(root, "EmoLabel", "list_patition_label.txt")
    if not os.path.isfile(label_file):
        raise FileNotFoundError(f"data-root: RAF-DB label file not found: {label_file}")
    image_dir = os.path.join(root, "Image", "aligned")
    _check_dir(image_dir, "data-root (RAF-DB aligned images)")
    mapping = class_mapping(RAF_LABELS, classes)
    samples = []
    with open(label_file) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(RAF_LABELS):
                raise ValueError(f"{label_file}:{line_no}: expected '<name>.jpg <label 1..7>', got {line.strip()!r}")
            name, label = parts[0], int(parts[1]) - 1
            if not name.startswith(split + "_") or label not in mapping:
                continue
            stem = os.path.splitext(name)[0]
            path = os.path.join(image_dir, f"{stem}_aligned.jpg")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"RAF-DB image listed in {label_file}:{line_no} not found: {path}")
            samples.append(Sample(path, mapping[label]))
    return samples


def _list_images(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def affectnet_samples(root: str, split: str, classes: Sequence[str]) -> list[Sample]:
    """DAN's converted AffectNet: <root>/{train,val}/<0..7>/*.jpg, folder index = AffectNet label
    (Neutral, Happiness, Sadness, Surprise, Fear, Disgust, Anger, Contempt); 'test' means val/
    (AffectNet's test set is not public). Classes the model lacks (Contempt for 7) are dropped."""
    folder = {"train": "train", "val": "val", "test": "val"}.get(split)
    if folder is None:
        raise ValueError(f"split: AffectNet has 'train' and 'val' (alias 'test'), got {split!r}")
    split_dir = os.path.join(root, folder)
    _check_dir(split_dir, f"data-root (AffectNet {folder}/)")
    mapping = class_mapping(AFFECTNET_LABELS, classes)
    samples = []
    for index in range(len(AFFECTNET_LABELS)):
        class_dir = os.path.join(split_dir, str(index))
        if index not in mapping or not os.path.isdir(class_dir):
            continue
        samples.extend(Sample(p, mapping[index]) for p in _list_images(class_dir))
    return samples


def folder_class_names(root: str, split: str = "train") -> list[str]:
    """Class folder names of an image-folder tree, sorted."""
    split_dir = os.path.join(root, split)
    _check_dir(split_dir, f"data-root ({split}/)")
    return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def folder_samples(root: str, split: str, classes: Sequence[str]) -> list[Sample]:
    """Image-folder tree <root>/<split>/<class name>/*; class folders match the model's classes by
    emotion name ('happy' -> Happiness) or exactly; 'test' falls back to val/ when test/ is absent."""
    split_dir = os.path.join(root, split)
    if split == "test" and not os.path.isdir(split_dir) and os.path.isdir(os.path.join(root, "val")):
        split_dir = os.path.join(root, "val")
    _check_dir(split_dir, f"data-root ({split}/)")
    names = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    mapping = class_mapping(names, classes)
    unknown = [n for i, n in enumerate(names) if i not in mapping]
    if unknown:
        raise ValueError(f"{split_dir}: class folders {unknown} are not among the model classes {list(classes)}")
    samples = []
    for i, name in enumerate(names):
        samples.extend(Sample(p, mapping[i]) for p in _list_images(os.path.join(split_dir, name)))
    return samples


_LOADERS = {"rafdb": rafdb_samples, "affectnet": affectnet_samples, "folder": folder_samples}


def build_dataset(dataset: str, root: str, split: str, classes: Sequence[str],
                  transform: Callable | None = None) -> FERDataset:
    """The `split` of `dataset` at `root`, labelled in the order of `classes` (the model's)."""
    if dataset not in _LOADERS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    samples = _LOADERS[dataset](root, split, classes)
    return FERDataset(samples, classes, transform, name=f"{dataset} {split} split at {root}")
