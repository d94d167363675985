"""FER command lines (models.train / evaluate / predict) on tiny synthetic datasets.

The images are solid colours (one colour per class: a learnable signal) written with PIL into tmp
dirs in the official layouts; the models are the real APViT / DAN classes built small through
--model-kwargs so that the whole file stays within the CI budget on two CPU cores.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from models import data as fer_data
from models.apvit import IMAGE_MEAN, IMAGE_STD
from models import checkpoint, evaluate, modeling, predict, recipes, train
from models.classes import APVIT_RAFDB_CLASSES, DAN_AFFECTNET7_CLASSES, DAN_RAFDB_CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_APVIT = {"embed_dim": 16, "num_heads": 2, "mlp_ratio": 2, "backbone_units": [1, 1, 1], "input_size": 16,
              "keep_patches": 3, "keep_rates": [1, 0.5]}
# RAF-DB label (1..7) -> colour; four classes keep the task learnable in a couple of epochs.
RAF_COLOURS = {4: (230, 40, 40), 5: (40, 230, 40), 1: (40, 40, 230), 7: (220, 220, 40)}


def _solid(path, colour, rng, size=24, jitter=25):
    colour = tuple(max(0, min(255, c + rng.randint(-jitter, jitter))) for c in colour)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def make_rafdb(root, n_train=16, n_test=8, seed=0, colours=RAF_COLOURS):
    """RAF-DB basic layout: EmoLabel/list_patition_label.txt + Image/aligned/<stem>_aligned.jpg."""
    rng = random.Random(seed)
    labels = list(colours)
    lines = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = labels[i % len(labels)]
            stem = f"{split}_{i + 1:05d}"
            _solid(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), colours[label], rng)
            lines.append(f"{stem}.jpg {label}")
    os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def raf_truth(root, split):
    """(path, class name) of a RAF-DB split, from the label file."""
    out = []
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt")) as f:
        for line in f:
            name, label = line.split()
            if name.startswith(split + "_"):
                path = os.path.join(root, "Image", "aligned", name[:-4] + "_aligned.jpg")
                out.append((path, fer_data.RAF_LABELS[int(label) - 1]))
    return out


def train_args(root, out, *extra, epochs=2, model="apvit", kwargs=TINY_APVIT):
    if model == "dan":  # DAN has no size knobs: a smaller input keeps its ResNet-18 cheap
        kwargs, extra = {}, ("--input-size", "32", *extra)
    return ["--model", model, "--dataset", "rafdb", "--data-root", str(root), "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "4", "--lr", "0.01", "--workers", "0", "--device", "cpu",
            "--seed", "3", "--model-kwargs", json.dumps(kwargs), *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def raf(tmp_path_factory):
    root = tmp_path_factory.mktemp("rafdb")
    make_rafdb(root)
    return root


@pytest.fixture(scope="module")
def apvit_run(raf, tmp_path_factory):
    """Two epochs of tiny APViT on the synthetic RAF-DB (shared by several tests)."""
    out = tmp_path_factory.mktemp("apvit_run")
    result = train.main(train_args(raf, out))
    return out, result


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------

def test_rafdb_layout_maps_labels_by_class_name(tmp_path):
    make_rafdb(tmp_path, n_train=8, n_test=4)
    for classes in (APVIT_RAFDB_CLASSES, DAN_RAFDB_CLASSES):
        ds = fer_data.build_dataset("rafdb", str(tmp_path), "train", classes)
        truth = raf_truth(tmp_path, "train")
        assert [s.path for s in ds.samples] == [p for p, _ in truth]
        assert [classes[s.label] for s in ds.samples] == [name for _, name in truth]
        assert len(fer_data.build_dataset("rafdb", str(tmp_path), "test", classes)) == 4
    # RAF label 1 (Surprise) is index 5 for APViT and index 0 for DAN.
    apvit = fer_data.build_dataset("rafdb", str(tmp_path), "train", APVIT_RAFDB_CLASSES)
    dan = fer_data.build_dataset("rafdb", str(tmp_path), "train", DAN_RAFDB_CLASSES)
    surprise = [i for i, (_, name) in enumerate(raf_truth(tmp_path, "train")) if name == "Surprise"]
    assert surprise and all(apvit.samples[i].label == 5 and dan.samples[i].label == 0 for i in surprise)
    image, label = apvit[0]
    assert image.mode == "RGB" and label == apvit.samples[0].label


def test_affectnet_layout_and_contempt(tmp_path):
    rng = random.Random(0)
    for split in ("train", "val"):
        for folder in range(8):
            for k in range(2):
                _solid(str(tmp_path / split / str(folder) / f"{k}.png"), (30 * folder, 0, 0), rng, jitter=0)
    ds8 = fer_data.build_dataset("affectnet", str(tmp_path), "train", modeling.model_classes("dan", "affectnet", 8))
    assert ds8.class_counts() == [2] * 8 and ds8.samples[0].label == 0 and ds8.samples[-1].label == 7
    ds7 = fer_data.build_dataset("affectnet", str(tmp_path), "test", list(DAN_AFFECTNET7_CLASSES))
    assert len(ds7) == 14 and "Contempt" not in ds7.classes  # 'test' reads val/, contempt dropped
    # APViT orders the same folders differently: folder 6 (anger) is APViT's class 0.
    ds_apvit = fer_data.build_dataset("affectnet", str(tmp_path), "train", APVIT_RAFDB_CLASSES)
    anger = [s for s in ds_apvit.samples if os.sep + "6" + os.sep in s.path]
    assert len(anger) == 2 and all(s.label == 0 for s in anger)


def test_folder_layout(tmp_path):
    rng = random.Random(0)
    for split in ("train", "val"):
        for name in ("happy", "sad", "Anger"):
            _solid(str(tmp_path / split / name / "a.jpg"), (0, 0, 0), rng)
    ds = fer_data.build_dataset("folder", str(tmp_path), "test", DAN_RAFDB_CLASSES)  # falls back to val/
    assert sorted(DAN_RAFDB_CLASSES[s.label] for s in ds.samples) == ["Anger", "Happiness", "Sadness"]
    args = train.parse_args(["--model", "dan", "--dataset", "folder", "--data-root", str(tmp_path), "--out", "x"])
    assert train.resolve_classes(args) == ["Anger", "Happiness", "Sadness"]
    os.makedirs(tmp_path / "train" / "unknown")
    with pytest.raises(ValueError, match="unknown"):
        fer_data.build_dataset("folder", str(tmp_path), "train", DAN_RAFDB_CLASSES)


def test_corrupt_missing_and_empty_errors(tmp_path):
    make_rafdb(tmp_path, n_train=4, n_test=2)
    bad = tmp_path / "Image" / "aligned" / "train_00002_aligned.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = fer_data.build_dataset("rafdb", str(tmp_path), "train", APVIT_RAFDB_CLASSES)
    ds[0]
    with pytest.raises(RuntimeError, match="train_00002_aligned.jpg"):
        ds[1]
    with pytest.raises(ValueError, match="unreadable image.*train_00002_aligned.jpg"):  # checked before training
        train.main(train_args(tmp_path, tmp_path / "run", epochs=1))
    os.remove(tmp_path / "Image" / "aligned" / "test_00001_aligned.jpg")
    with pytest.raises(FileNotFoundError, match="test_00001_aligned.jpg"):
        fer_data.build_dataset("rafdb", str(tmp_path), "test", APVIT_RAFDB_CLASSES)
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 4\n")
    with pytest.raises(ValueError, match="empty split"):
        fer_data.build_dataset("rafdb", str(tmp_path), "test", APVIT_RAFDB_CLASSES)
    os.makedirs(tmp_path / "aff" / "val" / "0")
    with pytest.raises(ValueError, match="empty split"):
        fer_data.build_dataset("affectnet", str(tmp_path / "aff"), "val", DAN_RAFDB_CLASSES)


def test_repeat_factor_sampler_is_deterministic_and_sharded():
    targets = [0] * 12 + [1] * 3 + [2]  # frequencies 0.75, 0.1875, 0.0625 -> repeats 1, 1, 2
    assert recipes.repeat_factor_indices(targets, 0.15) == list(range(16)) + [15]

    class Targets:
        def __init__(self, t):
            self.targets = t

        def __len__(self):
            return len(self.targets)

    ds = Targets(targets)
    for mode in ("shuffle", "repeat_factor", "balanced"):
        full = recipes.FERSampler(ds, mode, seed=5)
        full.set_epoch(2)
        order = list(full)
        full.set_epoch(2)
        assert list(full) == order
        shards = [recipes.FERSampler(ds, mode, num_replicas=2, rank=r, seed=5) for r in range(2)]
        for s in shards:
            s.set_epoch(2)
        a, b = (list(s) for s in shards)
        assert len(a) == len(b) == (len(order) + 1) // 2
        merged = [x for pair in zip(a, b) for x in pair][: len(order)]
        assert merged == order


# ---------------------------------------------------------------------------------------------
# metrics and evaluate
# ---------------------------------------------------------------------------------------------

class _GreyLevelModel(torch.nn.Module):
    """Predicts the class encoded in an image's grey level (10 + 20 * class): known predictions."""

    input_size, image_mean, image_std = 112, IMAGE_MEAN, IMAGE_STD

    def __init__(self, classes):
        super().__init__()
        self.classes = tuple(classes)

    def forward(self, images):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (self.image_mean, self.image_std))
        grey = ((images * std + mean) * 255).mean(dim=(1, 2, 3))
        k = torch.round((grey - 10) / 20).long()
        return torch.nn.functional.one_hot(k, len(self.classes)).float() * 5


def test_evaluate_metrics_match_hand_computed(tmp_path, monkeypatch):
    # (RAF label, APViT class the model predicts); APViT order: Anger0 Disgust1 Fear2 Sadness3 Happiness4 Surprise5
    cases = [(4, 4), (4, 3), (5, 3), (6, 0), (6, 0), (1, 4)]
    lines = []
    for i, (label, pred) in enumerate(cases):
        grey = 10 + 20 * pred
        path = tmp_path / "Image" / "aligned" / f"test_{i + 1:05d}_aligned.jpg"
        _solid(str(path), (grey, grey, grey), random.Random(0), jitter=0)
        lines.append(f"test_{i + 1:05d}.jpg {label}")
    os.makedirs(tmp_path / "EmoLabel")
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(checkpoint, "load_for_inference", lambda *a, **k: _GreyLevelModel(APVIT_RAFDB_CLASSES))
    out = tmp_path / "eval" / "metrics.json"
    evaluate.main(["--model", "apvit", "--checkpoint", "unused.pt", "--dataset", "rafdb", "--data-root",
                   str(tmp_path), "--device", "cpu", "--workers", "0", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["classes"] == list(APVIT_RAFDB_CLASSES)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert result["per_class_accuracy"] == {"Anger": 1.0, "Disgust": None, "Fear": None, "Sadness": 1.0,
                                            "Happiness": 0.5, "Surprise": 0.0, "Neutral": None}
    cm = [[0] * 7 for _ in range(7)]
    cm[0][0], cm[3][3], cm[4][4], cm[4][3], cm[5][4] = 2, 1, 1, 1, 1  # rows true, columns predicted
    assert result["confusion_matrix"] == cm
    assert (tmp_path / "eval" / "metrics_confusion.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# train / resume / predict / official checkpoints
# ---------------------------------------------------------------------------------------------

def test_train_loss_falls_and_writes_run_dir(apvit_run):
    out, result = apvit_run
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["test_loss"] < history[0]["test_loss"]
    assert history[1]["lr"] < history[0]["lr"]  # cosine schedule
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["model"] == "apvit" and ckpt["classes"] == list(APVIT_RAFDB_CLASSES)
    for key in ("state_dict", "optimizer", "scheduler", "scaler", "rng", "config"):
        assert key in ckpt
    assert ckpt["config"]["recipe"]["clip_grad_norm"] == 10.0 and ckpt["config"]["recipe"]["sampler"] == "repeat_factor"
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["best_acc"] == max(h["test_acc"] for h in history)


def test_interrupt_and_resume_continues_exactly(raf, apvit_run, tmp_path):
    reference_dir, _ = apvit_run
    out = tmp_path / "run"
    train.main(train_args(raf, out, "--stop-after", "1"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="lr: the resumed run uses 0.01"):
        train.main(train_args(raf, out, "--resume", str(out / "last.pt"), "--lr", "0.1"))
    train.main(train_args(raf, out, "--resume", str(out / "last.pt")))
    ref = torch.load(reference_dir / "last.pt", map_location="cpu", weights_only=True)
    got = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert got["epoch"] == 2
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "time_s"}
                          for line in path.read_text().splitlines()]
    assert strip(out / "metrics.jsonl") == strip(reference_dir / "metrics.jsonl")


def test_predict_matches_evaluate(raf, apvit_run, tmp_path):
    out, _ = apvit_run
    ckpt = str(out / "best.pt")
    result = evaluate.main(["--model", "apvit", "--checkpoint", ckpt, "--dataset", "rafdb", "--data-root", str(raf),
                            "--device", "cpu", "--workers", "0", "--batch-size", "3"])
    truth = raf_truth(raf, "test")
    paths = [p for p, _ in truth][::-1]  # predict keeps the input order, whatever it is
    preds = predict.main(["--model", "apvit", "--checkpoint", ckpt, "--device", "cpu", "--batch-size", "3",
                          "--no-detect", "--json", str(tmp_path / "p.json"), "--attention-out", str(tmp_path / "att"),
                          *paths])
    assert json.loads((tmp_path / "p.json").read_text()) == preds
    assert [p["path"] for p in preds] == paths
    names = dict(truth)
    accuracy = sum(p["label"] == names[p["path"]] for p in preds) / len(preds)
    assert accuracy == pytest.approx(result["accuracy"])
    for p in preds:
        assert list(p["probabilities"]) == list(APVIT_RAFDB_CLASSES)
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    overlays = sorted(os.listdir(tmp_path / "att"))
    assert len(overlays) == len(paths) and overlays[0] == "00000_test_00008_aligned_attention.png"
    assert Image.open(tmp_path / "att" / overlays[0]).size == (2 * 224, 224 + 16)
    # A directory expands to its images, sorted.
    listed = predict.main(["--model", "apvit", "--checkpoint", ckpt, "--device", "cpu", "--no-detect",
                           str(raf / "Image" / "aligned")])
    assert [p["path"] for p in listed] == sorted(p for p, _ in raf_truth(raf, "train") + truth)


def test_official_apvit_checkpoint_is_detected(raf, apvit_run, tmp_path):
    out, _ = apvit_run
    ours = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    official = tmp_path / "APViT_RAF-official.pth"
    torch.save({"meta": {"CLASSES": list(APVIT_RAFDB_CLASSES), "epoch": 40},
                "state_dict": {f"module.{k}": v for k, v in ours["state_dict"].items()}}, official)
    common = ["--model", "apvit", "--dataset", "rafdb", "--data-root", str(raf), "--device", "cpu", "--workers", "0"]
    a = evaluate.main([*common, "--checkpoint", str(out / "best.pt")])
    b = evaluate.main([*common, "--checkpoint", str(official), "--model-kwargs", json.dumps(TINY_APVIT)])
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["loss"] == pytest.approx(b["loss"])
    with pytest.raises(ValueError, match="holds a 'apvit' model"):
        evaluate.main([*common, "--checkpoint", str(out / "best.pt"), "--model", "dan"])


def test_dan_train_official_checkpoint_and_attention(raf, tmp_path, capsys):
    import torchvision

    resnet = tmp_path / "resnet18_msceleb.pth"
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=12).state_dict()}, resnet)
    out = tmp_path / "dan"
    result = train.main(train_args(raf, out, "--pretrained", f"resnet18={resnet}", model="dan"))
    assert "ResNet-18 (MS-Celeb-1M) -> features: 120 tensors loaded" in capsys.readouterr().err
    history = result["history"]
    assert result["classes"] == list(DAN_RAFDB_CLASSES)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    for h in history:  # the logged loss is CE + affinity + partition, all present
        assert h["train_affinity"] > 0 and h["train_partition"] > 0 and h["train_loss"] > h["train_affinity"]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["classes"] == list(DAN_RAFDB_CLASSES) and ckpt["input_size"] == 32
    assert ckpt["loss_state_dict"]["affinity.centers"].shape == (8, 512)  # rafdb.py's AffinityLoss default
    assert ckpt["config"]["recipe"]["schedule"] == "step" and ckpt["config"]["recipe"]["optimizer"] == "sgd"
    n_model = sum(1 for k in ckpt["state_dict"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(ckpt["optimizer"]["state"]) == n_model + 1  # the affinity centres are optimised too

    model = checkpoint.load_for_inference("dan", str(out / "last.pt"), torch.device("cpu"))
    official = tmp_path / "rafdb_epoch1_official.pth"
    torch.save({"iter": 1, "model_state_dict": model.official_state_dict()}, official)
    common = ["--model", "dan", "--dataset", "rafdb", "--data-root", str(raf), "--device", "cpu", "--workers", "0"]
    a = evaluate.main([*common, "--checkpoint", str(out / "last.pt")])
    b = evaluate.main([*common, "--checkpoint", str(official), "--input-size", "32"])
    assert a["classes"] == b["classes"] == list(DAN_RAFDB_CLASSES)
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)

    images = [p for p, _ in raf_truth(raf, "test")][:2]
    preds = predict.main(["--model", "dan", "--checkpoint", str(official), "--input-size", "32", "--device", "cpu",
                          "--no-detect", "--attention-out", str(tmp_path / "att"), *images])
    assert [p["path"] for p in preds] == images and list(preds[0]["probabilities"]) == list(DAN_RAFDB_CLASSES)
    overlays = sorted(os.listdir(tmp_path / "att"))
    assert len(overlays) == 2 and Image.open(tmp_path / "att" / overlays[0]).size == (4 * 224, 224 + 16)


def test_dan_affinity_centres_travel_in_checkpoints_and_resume(raf, tmp_path):
    """DAN RAF-DB checkpoints hold the official run's 8 affinity centres; a resumed run continues
    from them (and from their momentum) exactly."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(train_args(raf, whole, model="dan"))
    train.main(train_args(raf, parts, "--stop-after", "1", model="dan"))
    halfway = torch.load(parts / "last.pt", map_location="cpu", weights_only=True)
    train.main(train_args(raf, parts, "--resume", str(parts / "last.pt"), model="dan"))
    ref = torch.load(whole / "last.pt", map_location="cpu", weights_only=True)
    got = torch.load(parts / "last.pt", map_location="cpu", weights_only=True)
    centres = got["loss_state_dict"]["affinity.centers"]
    assert centres.shape == (8, 512) and got["config"]["recipe"]["affinity_centres"] == 8
    assert torch.equal(centres, ref["loss_state_dict"]["affinity.centers"])
    assert not torch.equal(centres, halfway["loss_state_dict"]["affinity.centers"])  # the second epoch moved them
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.skipif(os.environ.get("APKERNELS_SKIP_DDP") == "1", reason="APKERNELS_SKIP_DDP=1")
def test_torchrun_two_process_gloo_smoke(raf, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "models.train", *train_args(raf, out, epochs=1)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "APKERNELS_QUIET": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and "2 process(es)" in proc.stderr
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["state_dict"])
    # The sharded evaluation, summed over the ranks, is the whole test split on rank 0's saved model.
    single = evaluate.main(["--model", "apvit", "--checkpoint", str(out / "last.pt"), "--dataset", "rafdb",
                            "--data-root", str(raf), "--device", "cpu", "--workers", "0"])
    assert single["num_samples"] == 8
    assert history[0]["test_acc"] == single["accuracy"]
    assert history[0]["test_loss"] == pytest.approx(single["loss"], rel=1e-4)


def test_help_of_each_tool(capsys):
    for tool, flag in ((train, "--resume"), (evaluate, "--checkpoint"), (predict, "--attention-out")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--help"])
        assert exit_info.value.code == 0
        assert flag in capsys.readouterr().out
