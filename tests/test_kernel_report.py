"""benchmarks.kernel_report: the occupancy model, the ptxas parsing, the recorded Triton launches and
one Triton kernel compiled for sm_90 (no GPU needed), the global bytes counted in the Triton
interpreter and the CUDA emulator, the host aten ops and the targets."""
import json
import os

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
    # sm_90: 16 persistent clusters of 8 CTAs (132 SMs / 8); the CTA's shared memory holds its
    # channel slice of x and of pos (96 channels x 197 / 196 positions, fp32) + keys and partials.
    assert len(fwd) == 1 and fwd[0].grid == (128,) and fwd[0].threads == 512
    assert fwd[0].dynamic_shared_bytes == 155328
    # pool_backward: 196 rows x 768 channels / 4 per unit / 256 = 147 tiles x 8 batch chunks
    assert len(both) == 3 and both[1].grid == (256,) and both[2].grid == (147, 8)


def test_minimal_bytes_of_patch_pool():
    # fp32, B = 256: x [256, 768, 14, 14] + pos [196, 768] read, tokens [256, 160, 768] + index written.
    x, pos, tokens, index = 256 * 768 * 196 * 4, 196 * 768 * 4, 256 * 160 * 768 * 4, 256 * 160 * 8
    assert report.minimal_bytes("patch_pool", "fwd", "fp32", 256) == x + pos + tokens + index




def test_quick_report_of_the_triton_kernels(tmp_path):
    # The CI form of `python -m benchmarks.kernel_report`: every Triton kernel of every op compiled
    # for sm_90 at the paper batch (bf16); then the Triton global bytes measured in the interpreter
    # (a child process) for two ops at B=1, with the targets. The CUDA rows need nvcc and minutes:
    # left to --backend cuda.
    static, measured = tmp_path / "report.json", tmp_path / "bytes.json"
    out = run_python_compiled([
        "-c",
        "from benchmarks import kernel_report as r\n"
        f"r.main(['--quick', '--backend', 'triton', '--json', {str(static)!r}])\n"
        "r.main(['--backend', 'triton', '--op', 'patch_pool', '--op', 'dan_head_fusion', '--batch', '1', '--dtype',"
        f" 'bf16', '--global-bytes', '--check', '--json', {str(measured)!r}])\n",
    ])
    rows = json.loads(static.read_text())["rows"]
    keys = {"op", "backend", "pass", "dtype", "batch", "paper_scale", "global_bytes", "minimal_bytes", "launches",
            "max_registers", "spills", "host_aten_ops", "targets"}
    assert rows and all(keys <= set(row) for row in rows)
    assert {(r["op"], r["pass"]) for r in rows} == {(op, p) for op in report.OPS for p in report.PASSES}
    for row in rows:
        assert row["backend"] == "triton" and row["dtype"] == "bf16" and row["paper_scale"]
        assert row["global_bytes"] is None and row["targets"]["bytes"]["met"] is None  # not measured: n/a
        assert row["launches"] == len(row["kernels"]) >= 1 and 0 < row["max_registers"] <= 255
        assert row["minimal_bytes"] > 0 and isinstance(row["host_aten_ops"], list)
        assert set(row["targets"]) == set(report.TARGETS)
    assert "_patch_pool_kernel" in out
    rows = json.loads(measured.read_text())["rows"]
    assert {(r["op"], r["pass"], r["batch"]) for r in rows} == {
        (op, p, 1) for op in ("patch_pool", "dan_head_fusion") for p in report.PASSES}
    for row in rows:
        # Every input read and every output written at least once (both ops read all of their inputs).
        assert row["global_bytes_source"] == "interpreted at B=1"
        assert row["global_bytes"] >= row["minimal_bytes"], row
        assert row["targets"]["bytes"]["met"] is not None
    assert "Targets:" in out and "interpreted at B=1" in out


def test_interpreted_global_traffic_counts_each_access_of_a_known_kernel():
    # 10 elements in programs of 4: the third program's tail is masked off (2 active of 4).
    import torch
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    def _scale_kernel(src, dst, scale, counter, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src + offs, mask=mask, other=0.0)  # bf16: 2 bytes per active element
        s = tl.load(scale)  # unmasked scalar: 4 bytes per program
        tl.store(dst + offs, x.to(tl.float32) * s, mask=mask)  # fp32: 4 bytes per active element
        tl.atomic_add(counter, 1)  # an atomic reads and writes its element: 4 + 4 per program
        tl.atomic_cas(counter + 1, 0, 1)

    kernel = interpreter.InterpretedFunction(_scale_kernel)  # interpreted whether TRITON_INTERPRET is set or not
    src, dst = torch.arange(10, dtype=torch.bfloat16), torch.zeros(10)
    scale, counter = torch.tensor([2.0]), torch.zeros(2, dtype=torch.int32)
    originals = (interpreter.InterpretedFunction.run, JITFunction.run)
    with report.interpreted_global_traffic() as launches:
        # The interpreter's own copies of the arguments are not host ops of the caller.
        assert report.call_recording_aten(lambda: kernel[(3,)](src, dst, scale, counter, 10, BLOCK=4))[1] == []
        kernel[(1,)](src, dst, scale, counter, 3, BLOCK=4)  # a second launch is counted apart
        with pytest.raises(RuntimeError, match="compiled, not interpreted"):
            JITFunction(_scale_kernel).run(src, dst, scale, counter, 3, BLOCK=4, grid=(1,), warmup=False)
    assert torch.equal(dst, 2 * src.float()) and counter.tolist() == [4, 1]
    assert launches == [
        {"kernel": "_scale_kernel", "global_read_bytes": 10 * 2 + 3 * 4 + 3 * 4 + 3 * 4,
         "global_write_bytes": 10 * 4 + 3 * 4 + 3 * 4},
        {"kernel": "_scale_kernel", "global_read_bytes": 3 * 2 + 4 + 4 + 4, "global_write_bytes": 3 * 4 + 4 + 4},
    ]
    # The interpreter is as before: no hook left on the builder, the launch entry points restored.
    hooked = {"create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas"}
    assert not hooked & set(vars(interpreter.interpreter_builder))
    assert (interpreter.InterpretedFunction.run, JITFunction.run) == originals


def test_host_aten_ops_name_the_work_besides_the_kernels():
    import torch

    x = torch.ones(4, 3)

    def wrapper(x):
        torch.empty(5)  # allocations and views: no work
        x.view(-1), x.t(), x.contiguous(), x.to(torch.float32)  # no-ops: contiguous already, same dtype
        torch.zeros(3)  # a fill (aten::zeros calls fill_/zero_: counted once, as zeros)
        x.t().contiguous()  # a copy
        x.to(torch.bfloat16)  # a conversion
        torch.aminmax(x)  # a reduction
        return bool(x.any())  # a reduction and a host sync

    out, ops = report.call_recording_aten(wrapper, x)
    assert out is True
    assert ops == ["zeros", "contiguous", "to", "aminmax", "any", "is_nonzero"]


def test_measured_counters_extrapolate_affine_batches_only():
    def measure(bytes_at):
        return lambda op, pass_, dtype, batch: report.Measured(2, 1, bytes_at(batch), ("zeros",))

    exact = report.measured_counters(measure(lambda b: 100 + 10 * b), "probed", "dan_head_fusion", "fwd", "fp32", 2)
    assert exact == {"launches": 2, "backward_launches": 1, "global_bytes": 120, "global_bytes_source": "probed at B=2",
                     "host_aten_ops": ["zeros"]}
    far = report.measured_counters(measure(lambda b: 100 + 10 * b), "probed", "dan_head_fusion", "fwd", "fp32", 256)
    assert far["global_bytes"] == 100 + 10 * 256
    assert far["global_bytes_source"] == "probed at B=1,2,3, extrapolated (affine in B)"
    with pytest.raises(RuntimeError, match="not affine"):
        report.measured_counters(measure(lambda b: 100 * b * b), "probed", "dan_head_fusion", "fwd", "fp32", 256)
    assert report.measured_counters(lambda *a: None, "probed", "dan_head_fusion", "fwd", "fp32", 256) is None


def _row(**changes):
    kernel = dict(registers=40, spills=0, warps_per_sm=48, waves=2.5, persistent=False)
    row = dict(op="patch_pool", backend="cuda", dtype="fp32", batch=256, paper_scale=True, minimal_bytes=1000,
               **{"pass": "fwd+bwd"}, global_bytes=1100, launches=3, backward_launches=2, host_aten_ops=[], spills=0,
               min_warps_per_sm=48, kernels=[kernel])
    row.update(changes)
    return row


def test_targets_met_missed_and_not_measured():
    met = report.evaluate_targets(_row())
    assert {name: t["met"] for name, t in met.items()} == dict.fromkeys(report.TARGETS, True)
    missed = report.evaluate_targets(_row(global_bytes=1101, launches=4, backward_launches=3, host_aten_ops=["zeros"],
                                          spills=8, min_warps_per_sm=8,
                                          kernels=[dict(registers=255, spills=8, warps_per_sm=8, waves=0.6,
                                                        persistent=False)]))
    assert {name: t["met"] for name, t in missed.items()} == dict.fromkeys(report.TARGETS, False)
    assert missed["bytes"]["value"] == "1.10" and missed["launches"]["value"] == "1+3"
    assert missed["host ops"]["value"] == "zeros" and missed["waves"]["value"] == "0.60"
    forward = report.evaluate_targets(_row(**{"pass": "fwd"}, global_bytes=1051, launches=2, backward_launches=0))
    assert not forward["bytes"]["met"] and not forward["launches"]["met"]  # 1.05 for a forward; one launch
    persistent = report.evaluate_targets(_row(kernels=[dict(registers=40, spills=0, warps_per_sm=48, waves=1.0,
                                                            persistent=True)]))
    assert persistent["waves"]["met"]
    unmeasured = report.evaluate_targets(_row(global_bytes=None, backward_launches=None, host_aten_ops=None,
                                              kernels=[]))
    assert all(t["met"] is None for t in unmeasured.values())
    assert report.evaluate_targets(_row(paper_scale=False))["waves"] == {"met": None, "value": "-"}
    table = report.format_check_table([{**_row(), "targets": met}, {**_row(), "targets": missed}])
    assert "**MISSED** 1.10" in table and "6 met, 6 missed, 0 not measured" in table


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
    # >= minimal bytes; launches (forward and backward) as many as the host code's plan.
    for batch in (1, 256):
        for pass_ in report.PASSES:
            row = report.make_row(op, "cuda", pass_, "fp32", batch, [],
                                  counters=report.emulated_counters(op, pass_, "fp32", batch))
            ratio = report.traffic_ratio(row)
            assert ratio is not None and ratio < 10.0, (op, pass_, batch, row)
            assert row["global_bytes"] >= row["minimal_bytes"] - _never_needed_bytes(op, batch), (op, pass_, batch, row)
            planned = report._planned_launches(op, pass_, "fp32", batch)
            assert (row["launches"], row["backward_launches"]) == (planned["launches"], planned["backward_launches"])
            assert isinstance(row["host_aten_ops"], list)  # recorded with the profiler, equal at B=1,2,3
            assert row["global_bytes_source"] == ("emulated at B=1" if batch == 1 else
                                                  "emulated at B=1,2,3, extrapolated (affine in B)")


@needs_emulation
@pytest.mark.parametrize("op", report.OPS)
def test_extrapolated_global_bytes_match_a_measured_batch(op):
    # The affine extrapolation from B=1,2,3 against the emulator run at B=5 (bf16, forward+backward):
    # a kernel whose traffic grew faster than the batch would fail here.
    measured = report.emulated_counters(op, "fwd+bwd", "bf16", 5)
    exact = report._emulated_call(op, "fwd+bwd", "bf16", 5)  # a B=5 run
    assert measured["global_bytes_source"].startswith("emulated at B=1,2,3")
    assert (measured["launches"], measured["backward_launches"]) == (exact.launches, exact.backward_launches)
    assert measured["host_aten_ops"] == list(exact.host_aten_ops)
    # Within AFFINE_TOLERANCE: DAN's grad_z reads t only where z > 0, a count that varies between
    # random images by a few hundred elements in 10^5.
    assert measured["global_bytes"] == pytest.approx(exact.global_bytes, rel=report.AFFINE_TOLERANCE)


needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the Triton kernels are compiled here (a GPU): not interpreted")


@needs_interpreter
@pytest.mark.parametrize("op", ["patch_pool", "dan_spatial_pool"])
def test_interpreted_extrapolation_matches_a_measured_batch(op):
    # The Triton bytes extrapolated from B=1,2,3 against the interpreter run at B=5 (bf16,
    # forward+backward; patch_pool's position gradient is the fixed part): exact, no data-dependent loads.
    measured = report.interpreted_counters(op, "fwd+bwd", "bf16", 5)
    exact = report._interpreted_call(op, "fwd+bwd", "bf16", 5)
    assert measured["global_bytes_source"] == "interpreted at B=1,2,3, extrapolated (affine in B)"
    assert (measured["launches"], measured["backward_launches"]) == (exact.launches, exact.backward_launches)
    assert measured["global_bytes"] == exact.global_bytes
    assert measured["host_aten_ops"] == list(exact.host_aten_ops) == list(
        report.interpreted_counters(op, "fwd+bwd", "bf16", 1)["host_aten_ops"])


def test_cluster_pos_rereads_follow_the_host_plan():
    # plan_cluster (csrc/ops/cuda/patch_pool_kernel.cu) on 132 SMs: one cluster (one pos read) at
    # every measured batch, 3 clusters at B = 32 and 16 at B = 256, each reading pos [196, 768] once.
    pos_fp32 = 196 * 768 * 4
    assert [report._cluster_pos_reread_bytes("patch_pool", "fp32", b) for b in (1, 2, 3)] == [0, 0, 0]
    assert report._cluster_pos_reread_bytes("patch_pool", "fp32", 32) == 2 * pos_fp32
    assert report._cluster_pos_reread_bytes("patch_pool", "bf16", 256) == 15 * pos_fp32 // 2
    assert report._cluster_pos_reread_bytes("patch_pool", "fp32", 256, backend="triton") == 0
    assert report._cluster_pos_reread_bytes("token_pool", "fp32", 256) == 0
