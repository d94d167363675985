"""What the FER command lines share: checkpoint options, device choice, autocast, error exit."""
from __future__ import annotations

import contextlib
import os
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


def prog_name(module: str) -> str:
    """How the tool was started: the installed command (apkernels-train) or `python -m models.train`."""
    import sys

    command = os.path.basename(sys.argv[0])
    return command if command.startswith("apkernels-") else f"python -m {module}"


def default_workers() -> int:
    """Data-loading processes: 4, or fewer on a machine with fewer CPUs (more only oversubscribe)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


# What models.train writes into a run directory (--overwrite removes these, nothing else).
RUN_OUTPUTS = ("metrics.jsonl", "curves.png", "last.pt", "best.pt", "skipped_images.txt")


def claim_run_dir(out: str, overwrite: bool) -> None:
    """Refuse to start a run in a directory that already holds files, unless `overwrite`; then the
    previous run's outputs are removed so that none of them mixes with the new run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out} exists and is not a directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries:
        return
    if not overwrite:
        last = os.path.join(out, "last.pt")
        resume = f"--resume {last} to continue that run" if os.path.isfile(last) else "another --out"
        raise ValueError(f"out: {out} already exists and holds {', '.join(entries[:4])}"
                         f"{', ...' if len(entries) > 4 else ''}; pass {resume}, or --overwrite to start afresh in it")
    for name in RUN_OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


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
