"""models.export: torch.export (.pt2) and ONNX of APViT and DAN through the reference ops.

The models are small (APViT with a narrow ViT and one IR unit per stage at 32 x 32, DAN's real
ResNet-18 at 64 x 64) so that exporting both stays within the CI budget on two CPU cores. Their
BatchNorm statistics are set from random images first: with PyTorch's initial statistics a random
ResNet's activations grow to ~1e3 and float32 rounding alone would exceed the 1e-4 parity bound.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from apkernels import _extension, reference
from models import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_APVIT = {"embed_dim": 16, "num_heads": 2, "mlp_ratio": 2, "backbone_units": [1, 1, 1], "input_size": 32,
              "keep_patches": 12, "keep_rates": [1, 0.5, 0.75]}
DAN_INPUT = 64
LOGIT_TOLERANCE = 1e-4


def _calibrate_batchnorm(model, size: int):
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # the plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


def _model(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "apvit":
            model = export.load_model("apvit", None, model_kwargs=TINY_APVIT)
        else:
            model = export.load_model("dan", None, input_size=DAN_INPUT)
    return _calibrate_batchnorm(model, model.input_size)


def _images(model, batch: int, seed: int = 3):
    size = model.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _eager(name, model, images):
    with torch.no_grad():
        return [t.numpy() for t in export.ExportWrapper(name, model)(images)]


def _compare(name, got, want):
    """Logits within 1e-4, kept indices identical, DAN's attention maps to float32 rounding."""
    assert len(got) == len(want) == len(export.OUTPUT_NAMES[name])
    for out_name, g, w in zip(export.OUTPUT_NAMES[name], got, want):
        assert g.shape == w.shape, out_name
        if out_name == "logits":
            assert np.abs(g - w).max() <= LOGIT_TOLERANCE
        elif g.dtype == np.int64:
            np.testing.assert_array_equal(g, w, err_msg=out_name)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=out_name)


@pytest.fixture(scope="module", params=["apvit", "dan"])
def exported(request, tmp_path_factory):
    """(name, model, ExportedProgram, ONNX path) per model, exported once for the module."""
    name = request.param
    model = _model(name)
    program = export.export_program(name, model)
    onnx_path = str(tmp_path_factory.mktemp(name) / f"{name}.onnx")
    export.program_to_onnx(program, (export.example_input(model),), onnx_path, ["images"], export.OUTPUT_NAMES[name])
    return name, model, program, onnx_path


def test_exported_graph_holds_only_standard_ops(exported):
    name, _, program, _ = exported
    targets = {str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "apkernels" in t]
    assert all(t.startswith(("aten.", "<built-in")) for t in targets), targets
    if name == "apvit":  # the pooling ops are traced through their decomposition: sort + gather
        assert "aten.sort.stable" in targets and "aten.gather.default" in targets


def test_a_graph_that_calls_apkernels_ops_is_refused():
    class CallsTheOp(torch.nn.Module):
        def forward(self, x):
            return torch.ops.apkernels.patch_pool(x, 2, None, "sum_abs")

    program = torch.export.export(CallsTheOp(), (torch.randn(2, 3, 2, 2),))
    with pytest.raises(RuntimeError, match=r"apkernels ops \['apkernels.patch_pool.default'\]"):
        export.check_standard_ops(program)


@pytest.mark.skipif(_extension._C is None, reason="needs the compiled apkernels._C (the CPU kernels)")
def test_export_of_a_model_on_compiled_kernels_is_refused():
    model = _model("apvit")
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "cpu"  # the compiled kernels, i.e. torch.ops.apkernels.*
    with pytest.raises(RuntimeError, match="apkernels ops"):
        export.export_program("apvit", model)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_eager(exported, batch):
    ort = pytest.importorskip("onnxruntime")
    name, model, _, onnx_path = exported
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == list(export.OUTPUT_NAMES[name])
    images = _images(model, batch)  # the export traced batch 2: the batch dimension is dynamic
    _compare(name, session.run(None, {"images": images.numpy()}), _eager(name, model, images))


def test_onnx_top_k_keeps_the_lower_position_on_ties(tmp_path):
    """The reference top-k's tie rule survives the ONNX translation of its stable sort."""
    class PatchPool(torch.nn.Module):
        def forward(self, x):
            return reference.patch_pool(x, 5, None, "sum_abs")

    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 2.0, 3.0, 0.0]).view(1, 1, 3, 3).repeat(2, 4, 1, 1)
    x[1] = x[1].flip(-1)
    program = torch.export.export(PatchPool(), (x,))
    path = str(tmp_path / "pool.onnx")
    export.program_to_onnx(program, (x,), path, ["x"], ["tokens", "index"])
    ort = pytest.importorskip("onnxruntime")
    tokens, index = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    want_tokens, want_index = reference.patch_pool(x, 5, None, "sum_abs")
    assert want_index.tolist() == [[0, 2, 3, 4, 7], [0, 2, 4, 5, 7]]  # ties: the lower positions first
    np.testing.assert_array_equal(index, want_index.numpy())
    np.testing.assert_array_equal(tokens, want_tokens.numpy())


_RUN_WITHOUT_APKERNELS = """
import sys
sys.modules["apkernels"] = None  # any import of apkernels (or of models, which needs it) now fails
sys.modules["models"] = None
import numpy as np, torch
program = torch.export.load(sys.argv[1])
images = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    outputs = program.module()(images)
np.savez(sys.argv[3], *[t.numpy() for t in outputs])
print(sorted(m for m in sys.modules if m.startswith(("apkernels", "models")) and sys.modules[m] is not None))
"""


def test_pt2_runs_in_a_python_without_apkernels(exported, tmp_path):
    name, model, program, _ = exported
    path = str(tmp_path / f"{name}.pt2")
    torch.export.save(program, path)
    images = _images(model, 3)
    np.save(tmp_path / "images.npy", images.numpy())
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_APKERNELS, path, str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npz")], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # nothing of apkernels or models was loaded
    with np.load(tmp_path / "out.npz") as saved:
        got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    _compare(name, got, _eager(name, model, images))


def test_cli_exports_random_weights_with_a_warning(tmp_path, capsys):
    out = tmp_path / "sub" / "apvit.pt2"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        export.run(["--model", "apvit", "--format", "pt2", "--out", str(out), "--model-kwargs", json.dumps(TINY_APVIT)])
    assert "input images [batch, 3, 32, 32]" in capsys.readouterr().out
    program = torch.export.load(str(out))
    logits, patch_index, kept = program.module()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7) and patch_index.shape == (2, 12) and kept.shape == (2, 4)


def test_cli_exports_a_checkpoint_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model("apvit")
    checkpoint = tmp_path / "apvit_official.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    out = tmp_path / "apvit.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.run(["--model", "apvit", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out),
                     "--model-kwargs", json.dumps(TINY_APVIT)])
    assert not [w for w in caught if "RANDOM" in str(w.message)]  # a checkpoint: no random-weights warning
    images = _images(model, 2)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})
    _compare("apvit", got, _eager("apvit", model, images))


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--model", "dan", "--checkpoint", str(tmp_path / "missing.pth"), "--format", "onnx",
                     "--out", str(tmp_path / "dan.onnx")])
    assert exit_info.value.code == 2
    assert "missing.pth" in capsys.readouterr().err and not (tmp_path / "dan.onnx").exists()


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        export.parse_args(["--model", "resnet", "--format", "onnx", "--out", "x.onnx"])
    with pytest.raises(SystemExit):
        export.parse_args(["--model", "dan", "--format", "tflite", "--out", "x"])
