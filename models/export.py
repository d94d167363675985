"""Export APViT or DAN to ONNX or a torch.export program (.pt2) that runs without apkernels.

    python -m models.export --model apvit --checkpoint APViT_RAF-3eeecf7d.pth --format onnx --out apvit.onnx
    python -m models.export --model dan --format pt2 --out dan.pt2        # random weights (a warning)

The model is switched to backend="reference" before tracing, so every apkernels op is traced
through its pure-PyTorch decomposition (sort / top-k, gather, softmax, sums) and the exported graph
holds standard operators only: it runs in onnxruntime and, as .pt2, in a Python without apkernels
(`torch.export.load(path).module()(images)`). The batch dimension is dynamic.

Inputs: `images` [B, 3, S, S] float32, normalised as in evaluation (S = 112 for APViT, 224 for DAN).
Outputs: APViT `logits` [B, classes], `patch_index` [B, K] (positions kept by patch pooling) and
`kept_positions` [B, n] (patch tokens left after the last token pooling); DAN `logits` and
`attention` [B, heads, S/32, S/32] (each head's spatial attention map).
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from torch import nn

from . import checkpoint as checkpoints
from . import cli, modeling

FORMATS = ("onnx", "pt2")
OUTPUT_NAMES = {"apvit": ("logits", "patch_index", "kept_positions"), "dan": ("logits", "attention")}
MIN_BATCH, MAX_BATCH = 1, 4096


class ExportWrapper(nn.Module):
    """The model's outputs as a flat tuple of tensors (see OUTPUT_NAMES)."""

    def __init__(self, model_name: str, model: nn.Module):
        super().__init__()
        self.model_name, self.model = model_name, model

    def forward(self, images: torch.Tensor):
        if self.model_name == "apvit":
            logits, pooling = self.model(images, return_pooling=True)
            return logits, pooling.patch_index, pooling.kept_positions()
        logits, features, _ = self.model(images)
        return logits, self.model.cross_attention.spatial_attention(features)


def use_reference_backend(model: nn.Module) -> nn.Module:
    """Point every module that picks an apkernels backend at "reference" (pure PyTorch)."""
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "reference"
    return model


def load_model(model_name: str, checkpoint: str | None, classes=None, model_kwargs: dict | None = None,
               input_size: int | None = None) -> nn.Module:
    """The model in eval mode on the CPU, on the reference backend; random weights (with a warning)
    when `checkpoint` is None."""
    cpu = torch.device("cpu")
    if checkpoint:
        model = checkpoints.load_for_inference(model_name, checkpoint, cpu, classes, model_kwargs, input_size)
    else:
        warnings.warn(f"export: no --checkpoint given: exporting {model_name} with RANDOM weights", stacklevel=2)
        kwargs = dict(model_kwargs or {})
        if input_size is not None and model_name == "apvit":
            kwargs["input_size"] = input_size
        names = classes or modeling.model_classes(model_name, None, int(kwargs.pop("num_classes", 7)))
        model = modeling.build_model(model_name, names, kwargs, input_size).eval()
    return use_reference_backend(model)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    size = model.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def check_standard_ops(program: torch.export.ExportedProgram) -> None:
    """Raise RuntimeError when the graph calls torch.ops.apkernels.* (it would need apkernels to run)."""
    leftover = sorted({str(node.target) for node in program.graph_module.graph.nodes
                       if node.op == "call_function" and str(node.target).startswith("apkernels.")})
    if leftover:
        raise RuntimeError(f"export: the graph still calls apkernels ops {leftover}: it needs apkernels to run")


def export_program(model_name: str, model: nn.Module, batch: int = 2) -> torch.export.ExportedProgram:
    """torch.export of the wrapped model with a dynamic batch; raises if an apkernels op survived."""
    wrapper = ExportWrapper(model_name, model).eval()
    batch_dim = torch.export.Dim("batch", min=MIN_BATCH, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(wrapper, (example_input(model, batch),), dynamic_shapes=({0: batch_dim},))
    check_standard_ops(program)
    return program


def _onnx_stable_sort(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable (the reference top-k's tie rule: the lower position first) as ONNX TopK over the
    whole axis, which breaks ties the same way (ONNX: "the element with the lower index appears first")."""
    from onnxscript import opset18 as op

    shape = op.Shape(self)
    k = op.Gather(shape, op.Constant(value_ints=[dim]), axis=0)
    values, indices = op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def program_to_onnx(program: torch.export.ExportedProgram, example: tuple, path: str, input_names, output_names,
                    opset: int = 18) -> None:
    """Write an exported program as ONNX through torch.onnx's torch.export-based exporter (needs onnxscript)."""
    onnx_program = torch.onnx.export(program, example, dynamo=True, opset_version=opset, input_names=list(input_names),
                                     output_names=list(output_names),
                                     custom_translation_table={torch.ops.aten.sort.stable: _onnx_stable_sort},
                                     verbose=False)
    onnx_program.save(path)


def export_onnx(model_name: str, model: nn.Module, path: str, batch: int = 2, opset: int = 18) -> None:
    """ONNX of the wrapped model, dynamic batch."""
    program = export_program(model_name, model, batch)
    program_to_onnx(program, (example_input(model, batch),), path, ["images"], OUTPUT_NAMES[model_name], opset)


def export_pt2(model_name: str, model: nn.Module, path: str, batch: int = 2) -> None:
    torch.export.save(export_program(model_name, model, batch), path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(OUTPUT_NAMES))
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="a models.train checkpoint or an official release (default: random weights, with a warning)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="PATH")
    p.add_argument("--classes", default=None, metavar="A,B,...", help="output order of an official checkpoint")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON",
                   help="constructor arguments (random weights, or an official checkpoint's model)")
    p.add_argument("--input-size", type=int, default=None, metavar="PIXELS", help="image side (default the paper's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    return p.parse_args(argv)


def run(argv=None) -> str:
    """Parse the options, export, print a summary; returns the written path."""
    args = parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    model = load_model(args.model, args.checkpoint, classes, json.loads(args.model_kwargs), args.input_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "onnx":
        export_onnx(args.model, model, args.out, opset=args.opset)
    else:
        export_pt2(args.model, model, args.out)
    size = model.input_size
    print(f"wrote {args.out}: {args.model} ({len(model.classes)} classes: {', '.join(model.classes)}), "
          f"input images [batch, 3, {size}, {size}], outputs {', '.join(OUTPUT_NAMES[args.model])}")
    return args.out


def main(argv=None) -> None:
    """Command-line entry point (`python -m models.export`, console script `apkernels-export`): a bad
    option value or a missing file ends with one readable line (exit 2)."""
    cli.run_cli(lambda: run(argv), cli.prog_name("models.export"))


if __name__ == "__main__":
    main()
