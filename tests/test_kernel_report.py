"""benchmarks.kernel_report: the occupancy model, the ptxas parsing, the recorded Triton launches and
one Triton kernel compiled for sm_90 (no GPU needed)."""
import json

import pytest

from benchmarks import kernel_report as report
from tests.utils import run_python_compiled

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 3136 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 368 bytes cmem[0]
"""


def test_parse_ptxas():
    parsed = report.parse_ptxas(PTXAS_LOG)
    assert parsed["_Z6kernelPf"] == report.Resources(registers=96, spill_bytes=20, stack_bytes=16,
                                                     static_shared_bytes=3136)
    assert parsed["_Z5otherv"] == report.Resources(registers=32, spill_bytes=0, stack_bytes=0, static_shared_bytes=0)


@pytest.mark.parametrize(
    "registers,shared,threads,ctas,limiter",
    [
        (40, 36 * 1024, 512, 3, "registers"),  # 1280 regs/warp -> 51 warps -> 3 CTAs of 16 warps
        (104, 1200, 512, 1, "registers"),  # 3328 -> 19 warps -> 1 CTA
        (32, 0, 256, 8, "registers"),  # 64 warps -> 8 CTAs; threads allow 8 too
        (16, 0, 32, 32, "CTA slots"),
        (32, 100 * 1024, 128, 2, "shared memory"),  # (100 KB + 1 KB reserved) twice in 228 KB
    ],
)
def test_occupancy_sm90(registers, shared, threads, ctas, limiter):
    occ = report.occupancy(registers, shared, threads)
    assert (occ.ctas_per_sm, occ.limiter) == (ctas, limiter)
    assert occ.warps_per_sm == ctas * threads // 32


def test_cuda_plans_name_one_launch_per_forward_kernel():
    shapes = report.op_shapes("patch_pool", 256)
    fwd = report.cuda_plan("patch_pool", "fwd", "fp32", shapes)
    both = report.cuda_plan("patch_pool", "fwd+bwd", "fp32", shapes)
    assert len(fwd) == 1 and fwd[0].grid == (256,) and fwd[0].threads == 512
    assert len(both) == 3 and both[2].grid == (147,)  # 196 rows x 768 channels / 4 per pack / 256


def test_minimal_bytes_of_patch_pool():
    # fp32, B = 256: x [256, 768, 14, 14] + pos [196, 768] read, tokens [256, 160, 768] + index written.
    x, pos, tokens, index = 256 * 768 * 196 * 4, 196 * 768 * 4, 256 * 160 * 768 * 4, 256 * 160 * 8
    assert report.minimal_bytes("patch_pool", "fwd", "fp32", 256) == x + pos + tokens + index




def test_quick_report_of_the_triton_kernels(tmp_path):
    # The CI form of `python -m benchmarks.kernel_report`: every Triton kernel of every op compiled
    # for sm_90 at the paper batch (bf16). The CUDA rows need nvcc and minutes: left to --backend cuda.
    out = run_python_compiled([
        "-c",
        "from benchmarks import kernel_report as r\n"
        f"r.main(['--quick', '--backend', 'triton', '--json', {str(tmp_path / 'report.json')!r}])\n",
    ])
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    keys = {"op", "backend", "pass", "dtype", "batch", "paper_scale", "global_bytes", "minimal_bytes", "launches",
            "max_registers", "spills"}
    assert rows and all(keys <= set(row) for row in rows)
    assert {(r["op"], r["pass"]) for r in rows} == {(op, p) for op in report.OPS for p in report.PASSES}
    for row in rows:
        assert row["backend"] == "triton" and row["dtype"] == "bf16" and row["paper_scale"]
        assert row["global_bytes"] is None  # no measured traffic yet: never estimated
        assert row["launches"] == len(row["kernels"]) >= 1 and 0 < row["max_registers"] <= 255
        assert row["minimal_bytes"] > 0
    assert "_patch_pool_kernel" in out


def _emulation_built() -> bool:
    from apkernels import _emulation

    return _emulation._C_emulated is not None


needs_emulation = pytest.mark.skipif(not _emulation_built(), reason="the CUDA emulation build (_C_emulated) is absent")


def _never_needed_bytes(op, batch):
    """Bytes the minimal model counts that no kernel needs to touch (fp32): token_pool's gather
    reads only CLS and the kept rows of x, and its scores never use k's CLS row."""
    if op != "token_pool":
        return 0
    from benchmarks import specs

    dropped_rows = specs.APVIT_TOKENS - specs.APVIT_TOKEN_KEEP - 1
    return 4 * batch * (dropped_rows * specs.APVIT_CHANNELS + specs.APVIT_HEADS * specs.APVIT_HEAD_DIM)


@needs_emulation
@pytest.mark.parametrize("op", report.OPS)
def test_emulated_global_bytes_cover_the_minimal_bytes(op):
    # The real CUDA kernel code, fp32 forward+backward at B=1 (exact) and the paper batch
    # (extrapolated): every input read and every output written at least once, so global bytes moved
    # >= minimal bytes; launches as many as the host code's plan.
    for batch in (1, 256):
        for pass_ in report.PASSES:
            row = report.make_row(op, "cuda", pass_, "fp32", batch, [],
                                  counters=report.emulated_counters(op, pass_, "fp32", batch))
            ratio = report.traffic_ratio(row)
            assert ratio is not None and ratio < 10.0, (op, pass_, batch, row)
            assert row["global_bytes"] >= row["minimal_bytes"] - _never_needed_bytes(op, batch), (op, pass_, batch, row)
            assert row["launches"] == len(report.cuda_plan(op, pass_, "fp32", report.op_shapes(op, batch)))
            assert row["global_bytes_source"] == ("emulated at B=1" if batch == 1 else
                                                  "emulated at B=1,2,3, extrapolated (affine in B)")


@needs_emulation
@pytest.mark.parametrize("op", report.OPS)
def test_extrapolated_global_bytes_match_a_measured_batch(op):
    # The affine extrapolation from B=1,2,3 against the emulator run at B=5 (bf16, forward+backward):
    # a kernel whose traffic grew faster than the batch would fail here.
    measured = report.emulated_counters(op, "fwd+bwd", "bf16", 5)
    exact = report._emulated_call(op, "fwd+bwd", "bf16", 5)  # (launches, global bytes) of a B=5 run
    assert measured["global_bytes_source"].startswith("emulated at B=1,2,3")
    assert measured["launches"] == exact[0]
    # Within AFFINE_TOLERANCE: DAN's grad_z reads t only where z > 0, a count that varies between
    # random images by a few hundred elements in 10^5.
    assert measured["global_bytes"] == pytest.approx(exact[1], rel=report.AFFINE_TOLERANCE)
