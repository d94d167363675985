"""The compiled extension is really there: a broken or partial build must fail the suite, not skip.

Without _C every CPU/CUDA-backend test would skip and the suite would pass on the reference alone.
"""
import shutil

import torch

from apkernels import _extension, _library


def test_extension_loaded():
    assert _extension._C is not None, f"apkernels._C did not load: {_extension.LOAD_ERROR}"


def test_every_op_has_a_compiled_cpu_kernel():
    assert _extension.NATIVE["CPU"] == frozenset(_library.SCHEMAS), _extension.build_problems()


def test_cuda_kernels_compiled_when_the_toolkit_is_present():
    expected = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if _extension.build_config().get("APKERNELS_CUDA") == "0":
        expected = False  # a deliberate CPU-only build (APKERNELS_CUDA=0), recorded by the build
    assert _extension.cuda_kernels_expected() == expected
    if expected:
        assert _extension.NATIVE["CUDA"] == frozenset(_library.SCHEMAS), _extension.build_problems()
    assert _extension.build_problems() == []


def test_build_record_matches_the_running_torch():
    config = _extension.build_config()
    assert config.get("torch") == torch.__version__, f"_build_config.json: {config}"
