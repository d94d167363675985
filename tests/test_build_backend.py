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


# ---- Without torch in the target: a torch the target install accepts ----------------------------
# pip >= 26.2 does not apply the target install's constraints (pip config, PIP_CONSTRAINT) to build
# environments; an unconstrained `torch` there resolved to a newer torch than the target may install,
# and the wheel pinning it then failed to install (ResolutionImpossible).


def _specifiers(requirement):
    from packaging.requirements import Requirement

    return set(map(str, Requirement(requirement).specifier))


@pytest.fixture
def clean_pip_env(monkeypatch, tmp_path):
    """No constraint or requirement override from the caller's environment; a pip config file of
    the test's own (PIP_CONFIG_FILE, loaded after the machine's files, so its keys win)."""
    for name in ("PIP_CONSTRAINT", apkernels_backend.TORCH_REQUIREMENT_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "pip.conf"
    config.write_text("")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    return config


def test_target_without_torch_gets_a_torch_within_its_pip_constraints(tmp_path, monkeypatch, clean_pip_env):
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # a fresh environment: no torch (and no pip: PIP_CONSTRAINT is read directly)
    python = str(bare / "bin" / "python")
    if subprocess.run([python, "-I", "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("the base interpreter itself has torch")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\ntorchvision<=0.29.1\n")
    monkeypatch.setenv("PIP_CONSTRAINT", str(constraints))
    monkeypatch.setattr(apkernels_backend, "_torch_importable_here", lambda: False)
    monkeypatch.setattr(apkernels_backend.sys, "executable", python)
    assert apkernels_backend.target_torch_site_dir() is None
    (requirement,) = apkernels_backend.get_requires_for_build_wheel()
    assert _specifiers(requirement) == {">=2.11", "<=2.14.1"}
    (requirement,) = apkernels_backend.get_requires_for_build_editable()
    assert _specifiers(requirement) == {">=2.11", "<=2.14.1"}


def test_constraint_files_come_from_the_target_pip_config_with_pip_precedence(tmp_path, monkeypatch, clean_pip_env):
    # sys.executable's pip (the shared venv has one) reads the same config files a target install does.
    files = {name: tmp_path / f"{name}.txt" for name in ("global", "install", "env")}
    clean_pip_env.write_text(f"[global]\nconstraint = {files['global']}\n")
    assert apkernels_backend.target_pip_constraint_files(sys.executable) == [str(files["global"])]
    clean_pip_env.write_text(f"[global]\nconstraint = {files['global']}\n[install]\nconstraint = {files['install']}\n")
    assert apkernels_backend.target_pip_constraint_files(sys.executable) == [str(files["install"])]
    monkeypatch.setenv("PIP_CONSTRAINT", f"{files['env']} {files['global']}")
    assert apkernels_backend.target_pip_constraint_files(sys.executable) == [str(files["env"]), str(files["global"])]


def test_torch_constraints_are_read_like_pip_reads_constraint_files(tmp_path):
    nested = tmp_path / "sub" / "nested.txt"
    nested.parent.mkdir()
    nested.write_text("Torch >= 2.12 ; python_version >= '3'   # applies\n")
    main = tmp_path / "main.txt"
    main.write_text(
        "# comment line\n"
        "-c sub/nested.txt\n"
        "--constraint=sub/nested.txt\n"  # a cycle-free repeat: read once
        "numpy<3\n"
        "torch<2.14 \\\n"
        "    --hash=sha256:0123\n"
        "torch==1.0 ; python_version < '3'\n"  # marker false here: ignored
        "--index-url https://example.invalid/simple\n"
        "not a requirement !!\n"
    )
    found = apkernels_backend.torch_constraints([str(main), str(tmp_path / "missing.txt"), "https://example.invalid/c.txt"])
    assert sorted(str(r.specifier) for r in found) == ["<2.14", ">=2.12"]
    assert apkernels_backend.torch_constraints([main.as_uri()]) == found
    assert _specifiers(apkernels_backend.torch_build_requirement([str(main)])) == {">=2.11", ">=2.12", "<2.14"}
    assert apkernels_backend.torch_build_requirement([]) == apkernels_backend.TORCH_REQUIREMENT


def test_torch_requirement_variable_replaces_the_default_range(tmp_path, monkeypatch, clean_pip_env):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    monkeypatch.setenv(apkernels_backend.TORCH_REQUIREMENT_VARIABLE, "torch==2.13.0")
    assert _specifiers(apkernels_backend.torch_build_requirement([str(constraints)])) == {"==2.13.0", "<=2.14.1"}
    url = "https://example.invalid/torch-2.13.0-cp311-cp311-linux_x86_64.whl"
    monkeypatch.setenv(apkernels_backend.TORCH_REQUIREMENT_VARIABLE, f"torch @ {url}")
    assert apkernels_backend.torch_build_requirement([]) == f"torch @ {url}"
    for bad, message in (("numpy==2", "must name torch"), ("torch===", "is not a requirement")):
        monkeypatch.setenv(apkernels_backend.TORCH_REQUIREMENT_VARIABLE, bad)
        with pytest.raises(SystemExit, match=f"APKERNELS_TORCH_REQUIREMENT=.*{message}"):
            apkernels_backend.torch_build_requirement([])
