"""What a user of the command lines meets when something is off: bad checkpoint files, unreadable
images, an existing run directory, a finished run, file modes, worker counts, old pretrained files,
and the charts (integer epochs, readable captions, one panel per op)."""
import json
import os
import stat

import pytest
import torch
from PIL import Image

from models import data as fer_data
from models import cli, evaluate, overlay, plots, train
from models.checkpoint import load_file, load_matching
from models.classes import APVIT_RAFDB_CLASSES

from test_workflows import make_rafdb, train_args


# ---------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------

class Custom:
    """An arbitrary Python object in a checkpoint: the weights-only reader refuses it."""

def _bad_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(64)}, good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(64)}, legacy, _use_new_zipfile_serialization=False)
    files = {
        "empty.pt": (b"", "empty"),
        "random.pt": (bytes(range(7, 250)) * 8, "not a PyTorch checkpoint"),
        "truncated.pt": (data[: len(data) // 2], "truncated or corrupt"),
        "legacy_truncated.pt": (legacy.read_bytes()[:-40], "truncated"),
    }
    paths = {}
    for name, (content, why) in files.items():
        (tmp_path / name).write_bytes(content)
        paths[tmp_path / name] = why
    torch.save({"obj": Custom()}, tmp_path / "object.pt")
    paths[tmp_path / "object.pt"] = "Custom object"
    return paths


def test_bad_checkpoint_files_get_one_line_without_unsafe_advice(tmp_path):
    for path, why in _bad_checkpoints(tmp_path).items():
        with pytest.raises(ValueError) as info:
            load_file(path)
        message = str(info.value)
        assert str(path) in message and why in message, message
        assert "\n" not in message and "weights_only=False" not in message and "False" not in message, message


def test_evaluate_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "broken.pth"
    ckpt.write_bytes(b"\x80\x02garbage that is no pickle")
    monkeypatch.setattr("sys.argv", ["apkernels-evaluate", "--model", "apvit", "--checkpoint", str(ckpt),
                                     "--dataset", "rafdb", "--data-root", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as info:
        evaluate.command()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("apkernels-evaluate: error: checkpoint") and str(ckpt) in err
    assert len(err.splitlines()) == 1 and "weights_only" not in err


# ---------------------------------------------------------------------------------------------
# datasets, run directories, file modes
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def raf_with_bad_image(tmp_path):
    root = tmp_path / "raf"
    make_rafdb(root, n_train=8, n_test=4)
    bad = root / "Image" / "aligned" / "test_00002_aligned.jpg"
    bad.write_bytes(b"not a jpeg at all")
    return root, bad


def test_unreadable_image_stops_before_training_and_can_be_skipped(raf_with_bad_image, tmp_path, capsys):
    root, bad = raf_with_bad_image
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"1 unreadable image.*test_00002_aligned.jpg.*--skip-bad-images"):
        train.main(train_args(root, out, epochs=1))
    assert not out.exists()  # refused before anything was written

    old_umask = os.umask(0o027)
    try:
        result = train.main(train_args(root, out, "--skip-bad-images", epochs=1))
    finally:
        os.umask(old_umask)
    assert len(result["history"]) == 1
    skipped = (out / "skipped_images.txt").read_text()
    assert str(bad) in skipped and len(skipped.splitlines()) == 1
    # Every output honours the umask (checkpoints were 0600 while the rest were 0644).
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "skipped_images.txt"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o640, name

    # An existing run directory is refused; the message offers --resume and --overwrite.
    with pytest.raises(ValueError, match=r"already exists.*--resume .*last\.pt.*--overwrite"):
        train.main(train_args(root, out, "--skip-bad-images", epochs=1))
    # Resuming the finished run says it is complete and trains nothing.
    before = (out / "last.pt").read_bytes()
    result = train.main(train_args(root, out, "--skip-bad-images", "--resume", str(out / "last.pt"), epochs=1))
    assert result.get("complete") is True
    assert "the run is complete (all 1 epochs trained" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before
    # --overwrite starts afresh and removes the previous run's outputs.
    (out / "notes.txt").write_text("mine")
    result = train.main(train_args(root, out, "--overwrite", "--skip-bad-images", epochs=1))
    assert len(result["history"]) == 1 and (out / "notes.txt").read_text() == "mine"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_check_images_on_a_dataset(raf_with_bad_image):
    root, bad = raf_with_bad_image
    ds = fer_data.build_dataset("rafdb", str(root), "test", APVIT_RAFDB_CLASSES)
    with pytest.raises(ValueError, match="test_00002_aligned.jpg"):
        fer_data.check_images(ds, show_progress=False)
    assert len(ds) == 4
    bad_list = fer_data.check_images(ds, skip_bad=True, show_progress=False)
    assert [p for p, _ in bad_list] == [str(bad)] and len(ds) == 3


def test_workers_default_follows_the_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cli.default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert cli.default_workers() == 4
    args = train.parse_args(["--model", "dan", "--dataset", "rafdb", "--data-root", "x", "--out", "y"])
    assert args.workers == min(4, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------------------------
# pretrained files saved by old torch versions
# ---------------------------------------------------------------------------------------------

def test_missing_num_batches_tracked_is_filled_like_torch_does():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    old_file = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    old_file["1.running_mean"] = torch.full((4,), 0.5)
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    target[1].num_batches_tracked.fill_(7)
    report = load_matching(target, old_file, "old file")  # strict: must not refuse
    assert report.ok and report.filled == ["1.num_batches_tracked"]
    assert int(target[1].num_batches_tracked) == 0 and torch.equal(target[1].running_mean, old_file["1.running_mean"])
    assert "1 filled: 1.num_batches_tracked" in str(report)
    # A genuinely missing tensor still refuses, and the message names the CLI option that loosens it.
    del old_file["1.running_var"]
    with pytest.raises(ValueError, match="--pretrained-partial"):
        load_matching(target, old_file, "old file")
    args = train.parse_args(["--model", "dan", "--dataset", "rafdb", "--data-root", "x", "--out", "y",
                             "--pretrained-partial"])
    assert args.pretrained_partial


def test_dan_official_checkpoint_without_batch_counters_loads():
    from models import DAN

    source = DAN(num_classes=7).eval()
    state = {k: v for k, v in source.official_state_dict().items() if not k.endswith("num_batches_tracked")}
    report = DAN(num_classes=7).load_official_state_dict(state)
    assert report.ok and report.filled and all(k.endswith("num_batches_tracked") for k in report.filled)


# ---------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------

def test_curves_of_one_epoch_have_integer_ticks(tmp_path):
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5, "test_acc": 0.4,
                "test_balanced_acc": 0.3}]
    fig = plots.plot_curves(history, str(tmp_path))
    for ax in fig.axes:
        ticks = list(ax.get_xticks())
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_overlay_captions_sit_on_a_dark_box():
    bright = Image.new("RGB", (64, 64), (255, 255, 255))
    out = overlay.apvit_overlay(bright, torch.arange(196), torch.arange(196))  # nothing darkened
    caption_area = out.crop((2, 2, 60, 14)).convert("L")  # the first panel's title (no caption row)
    low, high = caption_area.getextrema()
    assert low < 100 and high > 200  # dark box behind bright text (yellow alone on white: low 226)


def test_benchmark_chart_has_one_panel_per_op_and_models(tmp_path):
    from benchmarks import suite

    rows = []
    for op in ("patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion"):
        for batch in (2, 8, 32):
            for pass_ in ("fwd", "fwd+bwd"):
                for provider, speedup in (("eager", 1.0), ("compile", 1.5), ("cpu", 3.0)):
                    rows.append({"op": op, "shape": f"B={batch}", "dtype": "fp32", "pass": pass_, "device": "cpu",
                                 "provider": provider, "speedup_vs_eager": speedup})
    for model in ("APViT", "DAN"):
        for provider, speedup in (("eager", 1.0), ("apkernels", 1.2)):
            rows.append({"kind": "model", "op": model, "shape": "B=4", "dtype": "fp32", "pass": "infer",
                         "device": "cpu", "provider": provider, "speedup_vs_eager": speedup})
    path = suite.plot_speedups(rows, str(tmp_path / "chart.png"), "test")
    width, height = Image.open(path).size
    assert width <= 1800 and height <= 1400, (width, height)  # was 1210 x 3645 for a full run
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_benchmark_exit_status_and_copy_note(capsys):
    from benchmarks import suite
    from benchmarks.__main__ import target_exit_status

    targets = [{"op": "patch_pool", "pass": "fwd", "status": "FAIL"}, {"op": "token_pool", "pass": "fwd", "status": "pass"}]
    assert target_exit_status(targets, check=True) == 1
    assert "patch_pool fwd" in capsys.readouterr().err
    assert target_exit_status(targets, check=False) == 0
    assert "informative without --check" in capsys.readouterr().out
    assert target_exit_status(targets[1:], check=True) == 0
    rows = [{"bandwidth_fraction": 3.24, "traffic_bytes": 3 * 2**20}, {"bandwidth_fraction": 0.5, "traffic_bytes": 1}]
    note = suite.copy_bandwidth_note(rows, 256)
    assert "1 row(s)" in note and "3.0 MiB" in note and "256 MiB" in note
    assert suite.copy_bandwidth_note(rows[1:], 256) is None
