"""What the FER command lines share: checkpoint options, device choice, autocast, error exit."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
