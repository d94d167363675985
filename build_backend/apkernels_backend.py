"""PEP 517 build backend of apkernels: setuptools' backend, plus torch as a build requirement only
when the environment being installed into has none.

pip builds in an isolated environment by default, but it runs this backend with the target
environment's interpreter. When that interpreter can import torch (found with `python -I`, which
ignores the isolation's PYTHONPATH overlay), setup.py compiles against that very torch, so no second
torch is downloaded and _C matches the torch it will run with. Otherwise torch is requested here,
installed into the build environment, compiled against, and pinned in the wheel's requirements.
"""
import os
import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (every other hook unchanged)

TORCH_REQUIREMENT = "torch>=2.11"


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


def _extra_requires():
    if _torch_importable_here() or target_torch_site_dir() is not None:
        return []
    return [TORCH_REQUIREMENT]


# setuptools' own get_requires_* would run setup.py, which needs torch; apkernels has no
# setup_requires, so pyproject's `requires` plus torch when needed is the whole list.
def get_requires_for_build_wheel(config_settings=None):
    return _extra_requires()


def get_requires_for_build_editable(config_settings=None):
    return _extra_requires()
