"""The helpers of tools/gpu_check.sh, which run for real only on a GPU lease: the returned-files
check, the ncu report, the bundle's fit test, the pytest time box and the benchmarks' deadline.
(`make gpu-rehearse` runs the whole script without a GPU.)"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_bundle  # noqa: E402
import gpu_check_report  # noqa: E402
import ncu_kernels  # noqa: E402

ROW = {k: None for k in gpu_check_report.ROW_KEYS}


def write_run(folder, rows=(ROW,), tests={"passed": 3, "failed": 0}, extra=()):
    """A returned folder as tools/gpu_check.sh lays it out."""
    os.makedirs(folder, exist_ok=True)
    steps = "\n".join(f"{s}: ok (1 s)" for s in gpu_check_report.STEPS)
    with open(os.path.join(folder, "summary.txt"), "w") as fh:
        fh.write(f"{steps}\n  gpu bundle: loaded (torch 2.11.0+cu130)\ngpu_check: 0 failed step(s)\n")
    doc = {k: "x" for k in gpu_check_report.JSON_KEYS}
    doc.update(rows=list(rows), skipped=[], torch="2.11.0+cu130", tests=tests)
    with open(os.path.join(folder, "nvidia-h200-2026-12-01-150000.json"), "w") as fh:
        json.dump(doc, fh)
    with open(os.path.join(folder, "junit.xml"), "w") as fh:
        fh.write('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="0"/></testsuites>')
    for name in extra:
        with open(os.path.join(folder, name), "w") as fh:
            fh.write("x")


def test_files_check_accepts_a_complete_run(tmp_path):
    write_run(tmp_path / "nvidia-h200-2026-12-01-150000", extra=("memcheck.log", "ncu.csv"))
    assert gpu_check_report.check_files(str(tmp_path), rehearsal=True, budget=180, elapsed=100) == []


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: [open(os.path.join(d, f"log{i}.txt"), "w").close() for i in range(6)], "files, at most 8"),
        (lambda d: os.makedirs(os.path.join(d, "a", "b")) or open(os.path.join(d, "a", "b", "f"), "w").close(), "folders down"),
        (lambda d: open(os.path.join(d, "bad name.txt"), "w").close(), "characters other than"),
        (lambda d: os.remove(os.path.join(d, "junit.xml")), "0 files named junit.xml"),
        (lambda d: open(os.path.join(d, "summary.txt"), "w").write("bundle: ok\n"), "says nothing of step smoke"),
    ],
    ids=["too-many-files", "too-deep", "bad-name", "no-junit", "summary-incomplete"],
)
def test_files_check_names_what_would_not_come_back(tmp_path, damage, expected):
    run = tmp_path / "run"
    write_run(run)
    damage(str(run))
    problems = gpu_check_report.check_files(str(tmp_path))
    assert any(expected in p for p in problems), problems


def test_files_check_wants_the_results_fields(tmp_path):
    write_run(tmp_path / "run", rows=[{"op": "patch_pool", "provider": "cuda"}], tests=None)
    problems = gpu_check_report.check_files(str(tmp_path), rehearsal=True, budget=10, elapsed=11)
    assert any("lacks" in p and "speedup_vs_compile" in p for p in problems), problems
    assert any("tests {passed, failed}" in p for p in problems), problems
    assert any("over its 10 s budget" in p for p in problems), problems


NCU_CSV = """==PROF== Connected to process 1 (python3)
"ID","Process ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed"
"","","","Mbyte","Kbyte","usecond","%"
"0","1","spin_kernel(long)","0","0","1.00","0.1"
"1","1","void pool_kernel<float>(...)","2,000.00","500.00","500.00","85.0"
"2","1","void grad_x_kernel<float>(...)","1.00","1,000.00","1.00","10.0"
"3","1","spin_kernel(long)","0","0","1.00","0.1"
"4","1","_patch_pool_kernel","4.00","0","2.00","50.0"
==PROF== Disconnected from process 1
"""


def test_ncu_report_groups_kernels_by_marker_and_converts_units(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ncu.csv"
    path.write_text(NCU_CSV)
    rows = ncu_kernels.read_csv(str(path))
    assert len(rows) == 5
    assert rows[1]["dram__bytes_read.sum"] == pytest.approx(2e9)  # "2,000.00" Mbyte
    assert rows[1]["dram__bytes_write.sum"] == pytest.approx(5e5)  # Kbyte
    assert rows[1]["gpu__time_duration.sum"] == pytest.approx(5e-4)  # usecond
    monkeypatch.setattr(ncu_kernels, "cases", lambda: [("patch_pool", "cuda", "fp32"), ("patch_pool", "triton", "fp32")])
    assert ncu_kernels.report(str(path)) == 0
    lines = capsys.readouterr().out.splitlines()
    cuda = next(line for line in lines if line.startswith("patch_pool cuda fp32"))
    # two kernels, 2e9 + 5e5 + 1e6 + 1e6 bytes in 501 us
    assert cuda.split()[3:6] == ["2", "2002.5", "501.0"]
    assert int(cuda.split()[6]) == round(2002.5e6 / 501e-6 / 1e9)
    assert any(line.startswith("patch_pool triton fp32") for line in lines)


def test_ncu_report_without_rows_fails(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text("==ERROR== Failed to initialize the profiler\n")
    assert ncu_kernels.report(str(path)) == 1


def make_tree(root):
    os.makedirs(root / "csrc" / "ops")
    (root / "setup.py").write_text("setup()\n")
    (root / "csrc" / "ops" / "k.cu").write_text("kernel\n")


def test_bundle_fingerprint_follows_the_sources(tmp_path):
    make_tree(tmp_path)
    before = gpu_bundle.fingerprint(str(tmp_path))
    (tmp_path / "csrc" / "ops" / "k.cu").write_text("kernel 2\n")
    changed = gpu_bundle.fingerprint(str(tmp_path))
    assert changed != before
    (tmp_path / "README.md").write_text("docs do not make a rebuild\n")
    assert gpu_bundle.fingerprint(str(tmp_path)) == changed


def test_bundle_misfit_says_why(tmp_path):
    bundle = tmp_path / "bundle"
    assert "no bundle" in gpu_bundle.misfit(None, str(bundle))
    os.makedirs(bundle / "apkernels")
    (bundle / "apkernels" / "_C.abi3.so").write_bytes(b"")
    manifest = {"torch": "2.11.0+cu130", "cuda_archs": "9.0", "fingerprint": gpu_bundle.fingerprint()}
    if torch.__version__ != manifest["torch"]:
        assert gpu_bundle.misfit(manifest, str(bundle)) == f"built for torch 2.11.0+cu130, running torch {torch.__version__}"
    manifest["torch"] = torch.__version__
    assert gpu_bundle.misfit(dict(manifest, fingerprint="0" * 16), str(bundle)).startswith("built from other sources")
    if not torch.cuda.is_available():
        assert gpu_bundle.misfit(manifest, str(bundle)) is None


def test_pytest_time_box_skips_what_did_not_start(tmp_path):
    (tmp_path / "test_models_x.py").write_text("def test_model():\n    pass\n")
    (tmp_path / "test_sample.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tools"))
    cmd = [sys.executable, "-m", "pytest", str(tmp_path), "-q", "-p", "no:cacheprovider", "-p", "gpu_pytest",
           "-rs", "--rootdir", str(tmp_path)]
    out = subprocess.run(cmd + ["--gpu-deadline-at", str(time.time())], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "3 skipped" in out.stdout and "time box" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(cmd + ["-vv", "--gpu-deadline-at", str(time.time() + 600)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "3 passed" in out.stdout, out.stdout + out.stderr
    order = [line.split("::")[1].split()[0] for line in out.stdout.splitlines() if "::test_" in line and "PASSED" in line]
    assert order == ["test_one", "test_two", "test_model"], order  # the whole-model tests last


def test_benchmarks_deadline_lists_the_rows_not_run(tmp_path):
    from benchmarks import __main__ as bench

    args = ["--device", "cpu", "--ops", "dan_head_fusion", "--batches", "2", "--no-models", "--no-plot",
            "--reps", "1", "--deadline-s", "0", "--out", str(tmp_path), "--tests-passed", "5"]
    assert bench.main(args) == 0
    (result,) = tmp_path.glob("*.json")
    doc = json.loads(result.read_text())
    assert doc["rows"] == []
    assert any("--deadline-s 0 reached" in s["reason"] for s in doc["skipped"])
    assert doc["tests"] == {"passed": 5, "failed": 0}
