"""Training survives a killed process: under `torchrun --max-restarts 1` (gloo, 2 processes on the
CPU) rank 1 SIGKILLs itself in the middle of epoch 2; torchrun restarts the group, and with
`--resume auto` the run continues from the checkpoint of epoch 1 by itself (losing only the part
of epoch 2 it had run) and finishes. `--resume auto` continues exactly (tests/test_workflows.py
checks that a resumed run ends bit-identical to an uninterrupted one)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from models import train
from tests.test_workflows import REPO, make_rafdb, train_args

pytestmark = pytest.mark.skipif(os.environ.get("APKERNELS_SKIP_DDP") == "1", reason="APKERNELS_SKIP_DDP=1")


def torchrun(root, out, env_extra=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "models.train",
           *train_args(root, out, "--resume", "auto", epochs=2)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "APKERNELS_QUIET": "1"}
    env.pop(train.KILL_HOOK_ENV, None)
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_killed_rank_restarts_and_resumes_from_last_checkpoint(tmp_path):
    root = tmp_path / "rafdb"
    make_rafdb(root)
    marker = tmp_path / "killed"
    killed = torchrun(root, tmp_path / "killed_run", {train.KILL_HOOK_ENV: f"1:1:1:{marker}"})
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert marker.exists(), "the kill hook never fired"
    log = killed.stderr
    # First attempt: a fresh start; after the kill, the restarted group resumes at epoch 2 of 2.
    assert "epochs 1..2" in log and "epochs 2..2" in log, log[-3000:]
    assert log.index("epochs 1..2") < log.index("epochs 2..2")

    run = tmp_path / "killed_run"
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["recipe"]["epochs"] == 2
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only thrash
    try:
        _resume_auto(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_auto(tmp_path):
    root = tmp_path / "rafdb"
    make_rafdb(root, n_train=8, n_test=4)
    out = tmp_path / "run"
    args = train_args(root, out, "--resume", "auto", "--stop-after", "1", epochs=2)
    assert train.resolve_resume(train.parse_args(args)) is None
    train.main(args)
    assert train.resolve_resume(train.parse_args(args)) == os.path.join(str(out), "last.pt")
    result = train.main(args)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    # A checkpoint of another recipe is not silently overwritten.
    with pytest.raises(ValueError, match="lr: the resumed run uses 0.01"):
        train.main([*args, "--lr", "0.1"])
