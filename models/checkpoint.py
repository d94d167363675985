"""Checkpoint loading shared by the models: read safely, unwrap, strip prefixes, report key problems.

Released checkpoints come in several wrappings: mmcv's ``{'state_dict': ..., 'meta': ...}``
(APViT), ``{'model_state_dict': ...}`` (DAN), face.evoLVe's bare state dict, sometimes saved from a
``DataParallel`` model (``module.`` prefixes). Everything here reads with
``torch.load(weights_only=True)`` and reports missing / unexpected / mis-shaped keys readably.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from .modeling import build_model, model_classes

STATE_DICT_KEYS = ("state_dict", "model_state_dict")
# Our own training checkpoints (models.train) carry this format tag and version.
CHECKPOINT_FORMAT = "apkernels-fer"
CHECKPOINT_VERSION = 1


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (a zip archive)
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode


def load_file(path) -> object:
    """``torch.load(path, weights_only=True)`` onto the CPU. A file that cannot be read raises a
    one-line ValueError naming it and what is wrong (empty, truncated, not a checkpoint, or holding
    objects the weights-only reader refuses), instead of torch's multi-line advice."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise ValueError(f"checkpoint {path}: the file is empty (0 bytes)")
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise ValueError(f"checkpoint {path}: not a PyTorch checkpoint (it starts with the bytes {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if refused:
            raise ValueError(f"checkpoint {path}: holds a {refused.group(1)} object; only tensors and plain "
                             "containers are read from checkpoints (weights only)") from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        raise ValueError(f"checkpoint {path}: corrupt pickled data"
                         + (f" ({reason.group(1).strip()})" if reason else "")) from None
    except EOFError:
        raise ValueError(f"checkpoint {path}: truncated (the data ends early)") from None
    except RuntimeError as exc:
        if "zip archive" in str(exc) or "central directory" in str(exc):
            raise ValueError(f"checkpoint {path}: truncated or corrupt (an incomplete zip archive)") from None
        raise ValueError(f"checkpoint {path}: unreadable ({str(exc).splitlines()[0]})") from None
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"checkpoint {path}: corrupt ({type(exc).__name__}: {exc})") from None


def load_mapping(path) -> Mapping:
    """load_file(path) that must hold a mapping (every checkpoint format read here is one)."""
    obj = load_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {os.fspath(path)}: holds a {type(obj).__name__}, expected a dict")
    return obj


def read_checkpoint(checkpoint) -> Mapping:
    """A checkpoint given as a path (read with ``weights_only=True`` onto the CPU) or a mapping."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint must be an existing file or a state dict, got the path {str(checkpoint)!r}")
        return load_mapping(checkpoint)
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise ValueError(f"checkpoint must be a path or a mapping (a state dict), got {type(checkpoint).__name__}")


def unwrap_state_dict(checkpoint, keys: Iterable[str] = STATE_DICT_KEYS) -> dict:
    """The tensors of a checkpoint: under one of `keys` if present, else the mapping itself, with any
    ``module.`` (DataParallel / DistributedDataParallel) prefixes removed."""
    obj = read_checkpoint(checkpoint)
    for key in keys:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(
            f"checkpoint holds no tensors (expected a state dict, bare or under one of {tuple(keys)}); "
            f"its keys are {sorted(map(str, obj))[:10]}"
        )
    return strip_prefix(state, "module.")


def strip_prefix(state: Mapping, prefix: str) -> dict:
    """`state` with `prefix` removed from every key that starts with it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def checkpoint_meta(checkpoint) -> dict:
    """The ``meta`` entry of an mmcv-style checkpoint (``{}`` when absent)."""
    obj = read_checkpoint(checkpoint)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _preview(keys, limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What loading a state dict into a module did. ``missing``: module keys the state dict did not
    provide; ``unexpected``: state dict keys the module has no place for; ``mismatched``: keys whose
    shapes differ (``key: checkpoint shape -> module shape``); ``ignored``: keys dropped on purpose;
    ``filled``: BatchNorm ``num_batches_tracked`` counters absent from files saved by torch < 0.4.1,
    set to 0 as torch's own loader does for such files."""

    what: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    filled: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"{self.what}: {len(self.loaded)} tensors loaded"]
        for name in ("missing", "unexpected", "mismatched", "ignored", "filled"):
            items = getattr(self, name)
            if items:
                lines.append(f"  {len(items)} {name}: {_preview(items)}")
        return "\n".join(lines)

    def fill_batch_counters(self, state_keys: Iterable[str]) -> None:
        """Move the missing ``*.num_batches_tracked`` of BatchNorms whose statistics `state_keys`
        has (an old file) from ``missing`` to ``filled``."""
        state_keys = set(state_keys)
        suffix = "num_batches_tracked"
        old_file = [k for k in self.missing if k.endswith("." + suffix) and k[: -len(suffix)] + "running_mean" in state_keys]
        self.missing = [k for k in self.missing if k not in old_file]
        self.filled += old_file

    def raise_if_incomplete(self) -> None:
        if not self.ok:
            raise ValueError(f"{self}\n(strict=False loads what matches; models.train: --pretrained-partial)")


def compare_state(module: torch.nn.Module, state: Mapping, what: str, allow_missing: Iterable[str] = (),
                  ignored: Iterable[str] = ()) -> LoadReport:
    """What loading `state` into `module` by name would do (nothing is copied). Module keys that
    start with one of `allow_missing` may be absent without counting as missing."""
    own = module.state_dict()
    allow_missing = tuple(allow_missing)
    report = LoadReport(what=what, ignored=list(ignored))
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key}: {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    report.fill_batch_counters(state)
    return report


def copy_state(module: torch.nn.Module, state: Mapping, report: LoadReport) -> None:
    """Copy the tensors `report` found loadable from `state` into `module`."""
    own = module.state_dict()
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(state[key])
        for key in report.filled:
            if key in own:
                own[key].zero_()


def load_matching(module: torch.nn.Module, state: Mapping, what: str, strict: bool = True,
                  allow_missing: Iterable[str] = (), ignored: Iterable[str] = ()) -> LoadReport:
    """Copy the tensors of `state` into `module` by name (shapes must match).

    With ``strict`` a ValueError lists every missing, unexpected or mis-shaped key and nothing is
    copied; otherwise what matches is copied and the report says what did not (a partial
    initialisation, e.g. the backbone only, passes `allow_missing` prefixes instead).
    """
    report = compare_state(module, state, what, allow_missing, ignored)
    if strict:
        report.raise_if_incomplete()
    copy_state(module, state, report)
    return report


# --- our training checkpoints, and loading either kind for inference ---------------------------


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, then rename: an interrupted save never
    leaves a truncated checkpoint behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give it the other outputs' mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_checkpoint_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: file not found: {path}")
    return load_mapping(path)


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
