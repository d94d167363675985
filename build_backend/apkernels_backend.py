"""PEP 517 build backend of apkernels: setuptools' backend, plus torch as a build requirement only
when the environment being installed into has none.

pip builds in an isolated environment by default, but it runs this backend with the target
environment's interpreter. When that interpreter can import torch (found with `python -I`, which
ignores the isolation's PYTHONPATH overlay), setup.py compiles against that very torch, so no second
torch is downloaded and _C matches the torch it will run with. Otherwise torch is requested here,
installed into the build environment, compiled against, and pinned in the wheel's requirements.

That torch must be one pip may then install into the target environment. pip (>= 26.2) no longer
applies the constraints of the target install (PIP_CONSTRAINT, `constraint` in pip's configuration
files) to build environments, so the torch requested here carries the torch constraints found in
them; APKERNELS_TORCH_REQUIREMENT replaces the default range (`torch>=2.11`).
"""
import ast
import os
import re
import subprocess
import sys
import urllib.parse

from setuptools import build_meta as _setuptools_backend
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook unchanged)

TORCH_REQUIREMENT = "torch>=2.11"
TORCH_REQUIREMENT_VARIABLE = "APKERNELS_TORCH_REQUIREMENT"
# pip's option precedence for `pip install`: environment variables, then [install], then [global].
PIP_CONFIG_SECTIONS = (":env:", "install", "global")


def target_torch_site_dir():
    """The site-packages folder holding the target environment's torch, or None."""
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        result = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else ""
    return path if os.path.isdir(path) else None


def _torch_importable_here():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def target_pip_constraint_files(python=None):
    """The constraint files `pip install` applies in the target environment: the `constraint`
    option of the target interpreter's pip configuration (its config files and PIP_CONSTRAINT, as
    `pip config list` reports them), else PIP_CONSTRAINT alone when that pip cannot be asked."""
    try:
        result = subprocess.run([python or sys.executable, "-I", "-m", "pip", "config", "list"],
                                capture_output=True, text=True, timeout=120)
        lines = result.stdout.splitlines() if result.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        lines = None
    if lines is None:
        return os.environ.get("PIP_CONSTRAINT", "").split()
    values = {}
    for line in lines:  # e.g. global.constraint='/etc/xdg/pip/constraints.txt'
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if name == "constraint" and section in PIP_CONFIG_SECTIONS:
            values[section] = ast.literal_eval(value)
    for section in PIP_CONFIG_SECTIONS:
        if values.get(section):
            return values[section].split()
    return []


def torch_constraints(paths, _seen=None):
    """The torch requirements (packaging Requirement objects) in pip constraint files, following
    their -c/-r includes; remote files and lines that are not requirements are skipped."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    seen = set() if _seen is None else _seen
    found = []
    for path in paths:
        if path.startswith("file:"):
            path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
        elif "://" in path:
            continue
        path = os.path.abspath(path)
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path) as fh:
                lines = fh.read().replace("\\\n", " ").splitlines()  # joined continuation lines
        except OSError:
            continue
        for line in lines:
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            include = re.fullmatch(r"(?:-c|--constraint|-r|--requirement)(?:\s*=\s*|\s+|(?<=-[cr]))(\S+)", line)
            if include:
                found += torch_constraints([os.path.join(os.path.dirname(path), include.group(1))], seen)
                continue
            if not line or line.startswith("-"):
                continue
            try:  # without per-requirement options such as --hash=...
                requirement = Requirement(re.split(r"\s+-", line)[0])
            except InvalidRequirement:
                continue
            if canonicalize_name(requirement.name) == "torch" and (requirement.marker is None or requirement.marker.evaluate()):
                found.append(requirement)
    return found


def torch_build_requirement(constraint_files=None):
    """The torch requirement for a build environment whose torch the target must accept:
    APKERNELS_TORCH_REQUIREMENT or `torch>=2.11`, narrowed by the target install's torch constraints."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    text = os.environ.get(TORCH_REQUIREMENT_VARIABLE, "").strip() or TORCH_REQUIREMENT
    try:
        requirement = Requirement(text)
    except InvalidRequirement as error:
        sys.exit(f"apkernels: {TORCH_REQUIREMENT_VARIABLE}={text!r} is not a requirement ({error}); expected e.g. torch==2.14.1")
    if canonicalize_name(requirement.name) != "torch":
        sys.exit(f"apkernels: {TORCH_REQUIREMENT_VARIABLE}={text!r} must name torch, e.g. torch==2.14.1")
    if constraint_files is None:
        constraint_files = target_pip_constraint_files()
    specifier, url = requirement.specifier, requirement.url
    for constraint in torch_constraints(constraint_files):
        specifier &= constraint.specifier
        url = url or constraint.url
    return f"torch @ {url}" if url else f"torch{specifier}"


def _target_has_torch():
    return _torch_importable_here() or target_torch_site_dir() is not None


def _extra_requires():
    if _target_has_torch():
        return []
    constraint_files = target_pip_constraint_files()
    requirement = torch_build_requirement(constraint_files)
    base = os.environ.get(TORCH_REQUIREMENT_VARIABLE, "").strip() or TORCH_REQUIREMENT
    # Shown by `pip install -v` (pip hides a successful build's output).
    print(f"apkernels: no torch in the target environment; the build environment gets {requirement} "
          f"({base} within the torch constraints of {', '.join(constraint_files) or 'no pip constraint file'})",
          file=sys.stderr)
    return [requirement]


def _report_build_torch():
    """After a build against the build environment's torch: which one, and what to do when the
    target cannot install it (pip then reports ResolutionImpossible on torch)."""
    if _torch_importable_here() and target_torch_site_dir() is None:
        import torch

        version = torch.__version__.split("+")[0]
        print(f"apkernels: compiled against torch {version} from pip's build environment (the target environment "
              f"has no torch), so the wheel requires torch=={version}; if pip cannot install it there, rebuild with "
              f"{TORCH_REQUIREMENT_VARIABLE}='torch==<a version it can install>' or install torch first", file=sys.stderr)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools_backend.build_wheel(wheel_directory, config_settings, metadata_directory)
    _report_build_torch()
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools_backend.build_editable(wheel_directory, config_settings, metadata_directory)
    _report_build_torch()
    return name


# setuptools' own get_requires_* would run setup.py, which needs torch; apkernels has no
# setup_requires, so pyproject's `requires` plus torch when needed is the whole list.
def get_requires_for_build_wheel(config_settings=None):
    return _extra_requires()


def get_requires_for_build_editable(config_settings=None):
    return _extra_requires()
