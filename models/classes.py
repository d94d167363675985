"""Class orders of the released models of APViT and DAN: APViT and DAN order RAF-DB differently,
so a checkpoint's outputs only mean something together with its own list.

Names are the same across lists (Anger, Disgust, Fear, Happiness, Sadness, Surprise, Neutral,
Contempt) so that `class_permutation` can map one model's outputs onto another's order.
"""
from __future__ import annotations

from typing import Sequence

# APViT remaps RAF-DB labels 1..7 to this order; Contempt is the 8th class where a dataset has it.
APVIT_RAFDB_CLASSES = ("Anger", "Disgust", "Fear", "Sadness", "Happiness", "Surprise", "Neutral")
APVIT_AFFECTNET7_CLASSES = APVIT_RAFDB_CLASSES
APVIT_AFFECTNET8_CLASSES = APVIT_RAFDB_CLASSES + ("Contempt",)

# DAN keeps RAF-DB's own labels 1..7 (0-based in the model).
DAN_RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
# DAN's AffectNet folders: neutral, happy, sad, surprise, fear, disgust, anger, contempt.
DAN_AFFECTNET8_CLASSES = ("Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
DAN_AFFECTNET7_CLASSES = DAN_AFFECTNET8_CLASSES[:7]


def default_classes(model: str, num_classes: int) -> tuple:
    """The class list a freshly built `model` ("apvit" / "dan") gets for `num_classes` outputs:
    the RAF-DB order for 7, the AffectNet-8 order for 8, generic names otherwise."""
    if model == "apvit":
        known = {7: APVIT_RAFDB_CLASSES, 8: APVIT_AFFECTNET8_CLASSES}
    elif model == "dan":
        known = {7: DAN_RAFDB_CLASSES, 8: DAN_AFFECTNET8_CLASSES}
    else:
        raise ValueError(f"model must be 'apvit' or 'dan', got {model!r}")
    return known.get(num_classes, tuple(f"class_{i}" for i in range(num_classes)))


def class_permutation(source: Sequence[str], target: Sequence[str]) -> list:
    """Indices `p` such that ``outputs_in_source_order[..., p]`` is in `target` order."""
    missing = [name for name in target if name not in source]
    if missing:
        raise ValueError(f"target classes {missing} are not among the source classes {tuple(source)}")
    return [list(source).index(name) for name in target]
