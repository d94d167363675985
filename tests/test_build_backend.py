"""The in-tree PEP 517 backend asks for torch only when the environment being installed into has none
(pip runs the backend with that environment's interpreter, even under build isolation)."""
import os
import subprocess
import sys
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "build_backend"))
import apkernels_backend  # noqa: E402


def test_target_with_torch_needs_no_torch_and_is_found(monkeypatch):
    monkeypatch.setattr(apkernels_backend, "_torch_importable_here", lambda: False)  # as in an isolated env
    site_dir = apkernels_backend.target_torch_site_dir()
    assert site_dir and os.path.isdir(os.path.join(site_dir, "torch"))
    assert apkernels_backend.get_requires_for_build_wheel() == []
    assert apkernels_backend.get_requires_for_build_editable() == []


def test_target_without_torch_gets_torch_as_a_build_requirement(tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # a fresh environment: no torch
    python = str(bare / "bin" / "python")
    if subprocess.run([python, "-I", "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("the base interpreter itself has torch")
    monkeypatch.setattr(apkernels_backend, "_torch_importable_here", lambda: False)
    monkeypatch.setattr(apkernels_backend.sys, "executable", python)
    assert apkernels_backend.target_torch_site_dir() is None
    assert apkernels_backend.get_requires_for_build_wheel() == [apkernels_backend.TORCH_REQUIREMENT]
