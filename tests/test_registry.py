"""The op registry (`apkernels._library.OP_TABLE`) is the one list of ops: every backend the build
claims has every op, every list of ops in the project derives from it, and the Python checks and
the compiled kernels' guards reject a bad argument with the same message."""
import re
from pathlib import Path

import pytest
import torch

import apkernels
from apkernels import _backend, _checks, _extension, _library, reference

ROOT = Path(__file__).resolve().parents[1]


def test_every_op_has_every_backend_the_build_claims():
    """A kernel left out of a backend fails here, not by quietly skipping its tests."""
    claimed = {}
    if _extension._C is not None:
        claimed["CPU"] = _extension.NATIVE["CPU"]
        if _extension.build_config().get("cuda"):
            claimed["CUDA"] = _extension.NATIVE["CUDA"]
    for key, native in claimed.items():
        missing = [op for op in _library.SCHEMAS if op not in native]
        assert not missing, f"apkernels._C was built with {key} kernels but has none for {missing}"
    if _backend.TRITON_IMPORT_ERROR is None:
        missing = [op for op in _library.SCHEMAS if op not in _backend.TRITON_OPS]
        assert not missing, f"Triton is available but no Triton kernel is registered for {missing}"
        for op in _library.SCHEMAS:
            for key in ("CPU", "CUDA"):
                assert _library.has_kernel(op + _library.TRITON_SUFFIX, key), (op, key)
    missing = [op for op in _library.SCHEMAS if not callable(getattr(reference, op, None))]
    assert not missing, f"no reference (apkernels.reference.<op>) for {missing}"
    for op in _library.SCHEMAS:  # the reference fallback: torch.ops.apkernels.<op> always runs
        assert _library.has_kernel(op, "CPU") and _library.has_kernel(op, "CUDA"), op


def test_registry_entries_are_consistent():
    for op in _library.OP_TABLE:
        assert (ROOT / "apkernels" / "ops" / f"{op.module}.py").is_file(), op
        assert (ROOT / "apkernels" / "triton_kernels" / f"{op.module}.py").is_file(), op
        assert op.backward is None or op.backward in _library.OP_DEFS, op
        assert op.public or op.backward is None, f"{op.name}: a backward op has no backward of its own"
        if op.public:
            assert op.backward is not None, f"{op.name}: a public op needs a backward op"
    assert _library.OPS == tuple(op.name for op in _library.OP_TABLE if op.public)


def test_every_op_list_derives_from_the_registry():
    from apkernels import ops, triton_kernels
    from apkernels.__main__ import demo_cases
    from benchmarks import specs

    assert apkernels.OPS == _library.OPS
    assert set(_library.OPS) <= set(apkernels.__all__)
    for op in _library.OPS:
        assert callable(getattr(apkernels, op)) and getattr(apkernels, op) is getattr(ops, op)
    assert list(ops.__all__) == list(_library.OPS)
    assert triton_kernels.MODULES == _library.MODULES
    assert tuple(specs.OPS) == _library.OPS
    assert tuple(name for name, _, _ in demo_cases("cpu", 1)) == _library.OPS


def test_schemas_take_symint_keep():
    """The output shape depends on keep: a SymInt, so torch.compile can keep it dynamic."""
    for op in ("patch_pool", "token_pool"):
        assert "SymInt keep" in str(getattr(torch.ops.apkernels, op).default._schema), op


# --- one message for a bad argument, whichever path catches it ----------------------------------------


def _bad_inputs():
    """(op, args of torch.ops.apkernels.<op>): each with exactly one thing wrong."""
    x, pos = torch.randn(2, 3, 2, 2), torch.randn(4, 3)
    xt, q = torch.randn(2, 5, 8), torch.randn(2, 2, 5, 4)
    xs, z = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 5, 3, 3)
    g = torch.randn(2, 4, 3)
    return [
        ("patch_pool", (torch.randn(2, 3, 4), 1, None, "sum_abs")),
        ("patch_pool", (x.long(), 2, None, "sum_abs")),
        ("patch_pool", (x, 0, None, "sum_abs")),
        ("patch_pool", (x, 5, pos, "sum_abs")),
        ("patch_pool", (x, 2, torch.randn(3, 3), "sum_abs")),
        ("patch_pool", (x, 2, pos.double(), "sum_abs")),
        ("patch_pool", (x, 2, pos, "mean")),
        ("token_pool", (xt.long(), q, q, 2, 0.5, "sum")),
        ("token_pool", (xt, q, q, 5, 0.5, "sum")),
        ("token_pool", (xt, q, torch.randn(2, 2, 6, 4), 2, 0.5, "sum")),
        ("token_pool", (xt, torch.randn(2, 3, 5, 4), q, 2, 0.5, "sum")),
        ("token_pool", (xt, q, q.double(), 2, 0.5, "sum")),
        ("token_pool", (xt[:, :1], q[:, :, :1], q[:, :, :1], 1, 0.5, "sum")),
        ("token_pool", (xt, q, q, 2, float("nan"), "sum")),
        ("token_pool", (xt, q, q, 2, 0.5, "sum_sq")),
        ("dan_spatial_pool", (xs[0], z)),
        ("dan_spatial_pool", (xs, z[0])),
        ("dan_spatial_pool", (xs, z[..., :2])),
        ("dan_spatial_pool", (xs, z.double())),
        ("dan_spatial_pool", (xs.long(), z.long())),
        ("dan_head_fusion", (g[0], g[0])),
        ("dan_head_fusion", (g, g[:, :, :2])),
        ("dan_head_fusion", (g, g.double())),
        ("dan_head_fusion", (g.long(), g.long())),
        ("pool_backward", (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long), 4, True)),
        ("pool_backward", (torch.randn(2, 3, 4), torch.zeros(2, 3), 4, True)),
        ("pool_backward", (torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), 4, True)),
        ("pool_backward", (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), -1, True)),
    ]


def _python_path(op, args):
    """The Python checks of a call: the public function's, or pool_backward's (its kernels' own)."""
    if op == "pool_backward":
        return _checks.pool_backward(*args[:3])
    if op == "patch_pool":
        x, keep, pos, score = args
        return apkernels.patch_pool(x, keep, pos, score=score, backend="reference")
    if op == "token_pool":
        x, q, k, keep, scale, score = args
        return apkernels.token_pool(x, q, k, keep, scale=scale, score=score, backend="reference")
    return getattr(apkernels, op)(*args, backend="reference")


_CPP_DTYPE_NAMES = {
    "torch.float32": "Float", "torch.float64": "Double", "torch.float16": "Half",
    "torch.bfloat16": "BFloat16", "torch.int64": "Long", "torch.int32": "Int",
}


def _normalised(message: str) -> str:
    """The message with dtypes spelt as the C++ guards print them (torch.float32 -> Float)."""
    return re.sub(r"torch\.\w+", lambda m: _CPP_DTYPE_NAMES.get(m.group(0), m.group(0)), message)


@pytest.mark.parametrize("op,args", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_python_checks_and_compiled_guards_say_the_same(op, args):
    with pytest.raises(ValueError) as python_error:
        _python_path(op, args)
    if op not in _extension.NATIVE["CPU"]:
        pytest.skip(f"no compiled CPU kernel for {op} here: only the Python message is checked")
    with pytest.raises(ValueError) as guard_error:
        getattr(torch.ops.apkernels, op)(*args)
    assert _normalised(str(python_error.value)) == _normalised(str(guard_error.value))


def test_importing_the_benchmarks_leaves_dynamo_config_alone():
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "limits = ('recompile_limit', 'cache_size_limit')\n"
        "before = {n: getattr(torch._dynamo.config, n) for n in limits if hasattr(torch._dynamo.config, n)}\n"
        "import benchmarks.specs, benchmarks.timing, benchmarks.checks\n"
        "after = {n: getattr(torch._dynamo.config, n) for n in before}\n"
        "assert before == after, (before, after)\n"
    )
    env = {**os.environ, "APKERNELS_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
