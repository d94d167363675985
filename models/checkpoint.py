"""Checkpoint loading shared by the models: read safely, unwrap, strip prefixes, report key problems.

Released checkpoints come in several wrappings: mmcv's ``{'state_dict': ..., 'meta': ...}``
(APViT), ``{'model_state_dict': ...}`` (DAN), face.evoLVe's bare state dict, sometimes saved from a
``DataParallel`` model (``module.`` prefixes). Everything here reads with
``torch.load(weights_only=True)`` and reports missing / unexpected / mis-shaped keys readably.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

STATE_DICT_KEYS = ("state_dict", "model_state_dict")


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


def read_checkpoint(checkpoint) -> Mapping:
    """A checkpoint given as a path (read with ``weights_only=True`` onto the CPU) or a mapping."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint must be an existing file or a state dict, got the path {str(checkpoint)!r}")
        obj = load_file(checkpoint)
        if not isinstance(obj, Mapping):
            raise ValueError(f"checkpoint {os.fspath(checkpoint)}: holds a {type(obj).__name__}, expected a dict")
        return obj
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
