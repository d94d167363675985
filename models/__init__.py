"""APViT and DAN on apkernels: ``from models import APViT, DAN, build_model``."""
from .apvit import APViT, PoolingIndices
from .classes import APVIT_RAFDB_CLASSES, DAN_RAFDB_CLASSES
from .dan import DAN
from .losses import AffinityLoss, PartitionLoss

MODELS = {"apvit": APViT, "dan": DAN}


def build_model(name: str, num_classes: int = 7, **kwargs):
    """Build a model by name: "apvit" or "dan" (case-insensitive); keyword arguments go to its class."""
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"build_model: name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[key](num_classes=num_classes, **kwargs)


__all__ = [
    "APViT",
    "DAN",
    "PoolingIndices",
    "AffinityLoss",
    "PartitionLoss",
    "build_model",
    "MODELS",
    "APVIT_RAFDB_CLASSES",
    "DAN_RAFDB_CLASSES",
]
