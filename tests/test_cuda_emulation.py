"""The CUDA emulator (apkernels._C_emulated): the CUDA kernel sources run on the CPU.

The op tests (test_<op>.py) already run every kernel against the reference through
backend_params ("cuda-cpu" ids). Here: every __global__ is launched, the fallback paths that the
op tests' shapes do not reach, the checks (each mutation of a kernel is reported), the counters,
and the backend plumbing.
"""
import os
import re
from pathlib import Path

import pytest
import torch

import apkernels
from apkernels import _emulation, reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "ops" / "cuda").glob("*.cu*"))

if os.environ.get("APKERNELS_CUDA_EMULATION") == "1":  # `make test` builds it: it must be there
    assert _emulation._C_emulated is not None, f"APKERNELS_CUDA_EMULATION=1 but {_emulation.LOAD_ERROR}"
pytestmark = pytest.mark.skipif(_emulation._C_emulated is None, reason=f"no emulation build ({_emulation.LOAD_ERROR})")

emu = _emulation._C_emulated
ops = torch.ops.apkernels


def global_kernels():
    """Names of every __global__ function in csrc/ops/cuda."""
    names = set()
    for path in CUDA_SOURCES:
        text = path.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text):
            names.add(m.group(1))
    return names


def launched(fn):
    """Run fn() and return the kernel names it launched (template arguments dropped)."""
    _emulation.reset_counters()
    fn()
    return [c["kernel"].split("<")[0].strip() for c in _emulation.counters()]


def source_line(path_suffix, pattern, after=0):
    """Line number (1-based) of the first line matching `pattern` in the CUDA source, plus `after`
    lines down to the next line that contains the call the mutation targets."""
    path = next(p for p in CUDA_SOURCES if p.name == path_suffix)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if pattern in line:
            return i + 1 + after
    raise AssertionError(f"{pattern!r} not found in {path}: update this test with the kernel")


def small_patch_case(channels_last=False, C=6, H=5, W=7, keep=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    pos = torch.randn(H * W, C, generator=g, dtype=dtype)
    return x, keep, pos


@pytest.fixture(autouse=True)
def clean_emulator():
    limit = emu.shared_memory_limit()
    emu.set_mutation("", "", 0)
    yield
    emu.set_mutation("", "", 0)
    emu.set_shared_memory_limit(limit)
    emu.set_compute_capability(9, 0)


def before_sm90():
    """Present the emulated device as sm_80: patch_pool then runs its pre-cluster kernel."""
    emu.set_compute_capability(8, 0)


def run_every_op():
    x, keep, pos = small_patch_case()
    xr = x.clone().requires_grad_()
    tokens, index = apkernels.patch_pool(xr, keep, pos, backend="cuda")  # sm_90: the cluster kernel
    tokens.sum().backward()
    before_sm90()
    apkernels.patch_pool(x, keep, pos, backend="cuda")  # the one-block-per-image kernel
    emu.set_compute_capability(9, 0)
    xt = torch.randn(2, 9, 8)
    q, k = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    apkernels.token_pool(xt, q, k, 4, scale=0.5, backend="cuda")
    xd = torch.randn(2, 5, 3, 4, requires_grad=True)
    zd = torch.randn(2, 3, 4, 3, 4, requires_grad=True)
    apkernels.dan_spatial_pool(xd, zd, backend="cuda").sum().backward()
    limit = emu.shared_memory_limit()
    emu.set_shared_memory_limit(1024)  # DAN's fused kernels do not fit: the fallback kernels run
    apkernels.dan_spatial_pool(xd, zd, backend="cuda").sum().backward()
    emu.set_shared_memory_limit(limit)
    for M in (3, 9):  # 9 heads: more than the single-pass kernels hold in registers
        g = torch.randn(2, M, 5, requires_grad=True)
        a = torch.randn(2, M, 5, requires_grad=True)
        fused, heads = apkernels.dan_head_fusion(g, a, backend="cuda")
        (fused.sum() + heads.sum()).backward()


def test_every_global_kernel_runs():
    names = global_kernels()
    assert len(names) >= 9, names
    ran = set(launched(run_every_op))
    assert names <= ran, f"never launched under emulation: {sorted(names - ran)}"


def reads_once(counters):
    """Every launch read each byte it read once (no re-read of an input, not even from a cache)."""
    return all(c["global_read_bytes"] == c["global_read_distinct_bytes"] for c in counters)


def test_dan_spatial_pool_launches_and_fallback():
    """One launch forward (s written once), one backward reading the saved s, every input byte
    read once; when the maps and grad_g outgrow the shared memory, the earlier kernels run: 2
    launches forward, 3 backward (still with the saved s)."""
    gen = torch.Generator().manual_seed(4)
    x, z = torch.randn(2, 5, 3, 4, generator=gen), torch.randn(2, 3, 4, 3, 4, generator=gen)
    gg = torch.randn(2, 3, 5, generator=gen)
    want_g, want_s = reference.dan_spatial_pool(x, z)
    want = reference.dan_spatial_pool_backward(gg, x, z, want_s)
    fused = (["spatial_pool_kernel"], ["spatial_pool_backward_kernel"])
    fallback = (["channel_reduce_kernel", "pool_kernel"], ["channel_reduce_kernel", "grad_x_kernel", "grad_z_kernel"])
    for limit, (forward_kernels, backward_kernels) in ((None, fused), (1024, fallback)):
        if limit is not None:
            emu.set_shared_memory_limit(limit)
        out = {}
        assert launched(lambda: out.update(fwd=ops.dan_spatial_pool_cuda_emulated(x, z))) == forward_kernels
        if limit is None:
            (launch,) = _emulation.counters()
            assert reads_once([launch]) and launch["global_write_bytes"] == launch["global_write_distinct_bytes"]
            assert launch["global_write_bytes"] == 4 * (2 * 3 * 5 + 2 * 3 * 12)  # g and s, once
        g, s = out["fwd"]
        torch.testing.assert_close(g, want_g)
        torch.testing.assert_close(s, want_s)
        assert launched(lambda: out.update(bwd=ops.dan_spatial_pool_backward_cuda_emulated(gg, x, z, s))) == backward_kernels
        if limit is None:
            assert reads_once(_emulation.counters())
        for got, expect in zip(out["bwd"], want):
            torch.testing.assert_close(got, expect)


def test_dan_spatial_pool_maps_larger_than_half_a_block():
    """Maps of more than 256 positions: one thread per position and no partial-sum rows (R = 1 in
    spatial_pool_kernel and its backward), still one launch each way and equal to the reference."""
    gen = torch.Generator().manual_seed(9)
    x, z = torch.randn(2, 3, 17, 17, generator=gen), torch.randn(2, 2, 4, 17, 17, generator=gen)
    gg = torch.randn(2, 2, 3, generator=gen)
    want_g, want_s = reference.dan_spatial_pool(x, z)
    out = {}
    assert launched(lambda: out.update(fwd=ops.dan_spatial_pool_cuda_emulated(x, z))) == ["spatial_pool_kernel"]
    g, s = out["fwd"]
    torch.testing.assert_close(g, want_g)
    torch.testing.assert_close(s, want_s)
    assert launched(lambda: out.update(bwd=ops.dan_spatial_pool_backward_cuda_emulated(gg, x, z, s))) == [
        "spatial_pool_backward_kernel"]
    for got, expect in zip(out["bwd"], reference.dan_spatial_pool_backward(gg, x, z, want_s)):
        torch.testing.assert_close(got, expect)


def test_dan_head_fusion_single_pass_and_fallback_for_many_heads():
    """Up to 8 heads: one pass, each input byte read once (forward and backward); 9 heads: the
    two-pass kernels. Both match the reference."""
    gen = torch.Generator().manual_seed(6)
    for M, kernels in ((4, ["head_fusion_registers_kernel", "head_fusion_backward_registers_kernel"]),
                       (9, ["head_fusion_kernel", "head_fusion_backward_kernel"])):
        g, a = torch.randn(3, M, 7, generator=gen), torch.randn(3, M, 7, generator=gen)
        gf, gh = torch.randn(3, 7, generator=gen), torch.randn(3, M, 7, generator=gen)
        out = {}
        assert launched(lambda: out.update(fwd=ops.dan_head_fusion_cuda_emulated(g, a))) == kernels[:1]
        assert reads_once(_emulation.counters()) == (M <= 8)
        fused, heads = out["fwd"]
        want_fused, want_heads = reference.dan_head_fusion(g, a)
        torch.testing.assert_close(fused, want_fused)
        torch.testing.assert_close(heads, want_heads)
        assert launched(lambda: out.update(bwd=ops.dan_head_fusion_backward_cuda_emulated(gf, gh, g, a, heads))) == kernels[1:]
        assert reads_once(_emulation.counters()) == (M <= 8)
        for got, expect in zip(out["bwd"], reference.dan_head_fusion_backward(gf, gh, g, a, heads)):
            torch.testing.assert_close(got, expect)


def test_every_op_has_an_emulated_kernel():
    missing = [op for op in _emulation._library.SCHEMAS if not _emulation.available(op)]
    assert not missing, f"the emulation build has no kernel for {missing}: a .cu file without its wrap_*.cpp?"


def test_backend_plumbing():
    for op in ("patch_pool", "token_pool", "pool_backward", "dan_spatial_pool", "dan_head_fusion"):
        assert "cuda" in apkernels.available_backends(op, "cpu")
    x, keep, pos = small_patch_case()
    assert launched(lambda: apkernels.patch_pool(x, keep, pos)) == []  # "auto" never emulates
    assert "patch_pool_cluster_kernel" in launched(lambda: apkernels.patch_pool(x, keep, pos, backend="cuda"))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patch_pool_keys_in_global_memory(channels_last):
    """Selection keys that do not fit the shared memory live in a global workspace."""
    # NCHW needs the transpose tiles (34816 bytes) in shared memory: make the keys alone too big.
    C, H, W, limit = (2, 67, 67, 34816) if not channels_last else (6, 5, 7, 256)
    x, _, pos = small_patch_case(channels_last, C=C, H=H, W=W, keep=3)
    x = x[:1]
    before_sm90()
    emu.set_shared_memory_limit(limit)
    _emulation.reset_counters()
    tokens, index = apkernels.patch_pool(x, 7, pos, backend="cuda")
    (launch,) = _emulation.counters()
    assert launch["dynamic_shared_bytes"] == (0 if channels_last else 34816)  # keys not in shared memory
    ref_tokens, ref_index = reference.patch_pool(x, 7, pos, "sum_abs")
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(tokens, ref_tokens)


def test_patch_pool_vector_loads_and_opt_in_shared_memory():
    """channels_last x with C a multiple of the 16-byte pack: x rows and pos rows move as packs; 6400
    positions: 51200 bytes of keys, above the 48 KB default (cudaFuncSetAttribute opt-in)."""
    before_sm90()
    for H, W, keep in ((5, 7, 9), (80, 80, 5)):
        x, _, pos = small_patch_case(True, C=8, H=H, W=W, keep=keep)
        x = x[:1]
        _emulation.reset_counters()
        tokens, index = apkernels.patch_pool(x, keep, pos, backend="cuda")
        assert _emulation.counters()[0]["dynamic_shared_bytes"] == (H * W * 8 if H * W > 1000 else 280)
        ref_tokens, ref_index = reference.patch_pool(x, keep, pos, "sum_abs")
        assert torch.equal(index, ref_index)
        torch.testing.assert_close(tokens, ref_tokens)


def test_token_pool_keys_in_global_memory():
    x = torch.randn(2, 40, 8)
    qkv = torch.randn(2, 40, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    emu.set_shared_memory_limit(64)
    _emulation.reset_counters()
    tokens, index = apkernels.token_pool(x, q, k, 5, scale=0.3, backend="cuda")
    assert _emulation.counters()[0]["dynamic_shared_bytes"] == 2 * 4 * 4  # q's CLS row only (fp32)
    ref_tokens, ref_index = reference.token_pool(x, q, k, 5, 0.3, "sum")
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(tokens, ref_tokens)


# ---- patch_pool on sm_90: a thread-block cluster per image -------------------------------------

CLUSTER_KERNEL = "patch_pool_cluster_kernel"


def cluster_launch(x, keep, pos, score="sum_abs"):
    """Run patch_pool on the emulated sm_90 device: (tokens, index, the launch's counters)."""
    _emulation.reset_counters()
    tokens, index = apkernels.patch_pool(x, keep, pos, score=score, backend="cuda")
    (launch,) = _emulation.counters()
    assert launch["kernel"].startswith(CLUSTER_KERNEL), launch["kernel"]
    return tokens, index, launch


def check_against_reference(x, keep, pos, tokens, index, score="sum_abs"):
    ref_tokens, ref_index = reference.patch_pool(x, keep, pos, score)
    assert torch.equal(index, ref_index)
    assert tokens.dtype == x.dtype and tokens.is_contiguous()
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)  # a copy (+ pos rounded once): exact


def int_inputs(B, C, H, W, dtype=torch.float32, pos_shape="2d", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (B, C, H, W), generator=g).to(dtype)
    pos = {None: None, "2d": (H * W, C), "3d": (1, H * W, C)}[pos_shape]
    if pos is not None:
        pos = torch.randint(-4, 5, pos, generator=g).to(dtype)
    return x, pos


def test_cluster_kernel_reads_x_once():
    """Every input byte read once (pos once per cluster), every output byte written once."""
    B, C, H, W, keep = 5, 16, 5, 7, 9
    x, pos = int_inputs(B, C, H, W)
    tokens, index, launch = cluster_launch(x, keep, pos)
    check_against_reference(x, keep, pos, tokens, index)
    # C = 16: clusters of 8 blocks; the emulated device's 4 SMs hold one cluster, which loops over
    # the 5 images (persistent grid).
    assert launch["cluster"] == (8, 1, 1) and launch["grid"] == (8, 1, 1) and launch["block"] == (512, 1, 1)
    clusters = launch["grid"][0] // 8
    x_bytes, pos_bytes = x.numel() * 4, pos.numel() * 4
    assert launch["global_read_bytes"] == launch["global_read_distinct_bytes"] == x_bytes + clusters * pos_bytes
    out_bytes = tokens.numel() * 4 + index.numel() * 8
    assert launch["global_write_bytes"] == launch["global_write_distinct_bytes"] == out_bytes


def test_cluster_kernel_several_clusters_loop_over_images():
    """C = 3: clusters of 2 blocks (the second owns one channel), 2 clusters on 4 SMs, 3 + 2 images."""
    B, C, H, W, keep = 5, 3, 5, 7, 12
    x, _ = int_inputs(B, C, H, W, seed=3)
    for score in reference.PATCH_SCORES:
        tokens, index, launch = cluster_launch(x, keep, None, score)
        check_against_reference(x, keep, None, tokens, index, score)
        assert launch["cluster"] == (2, 1, 1) and launch["grid"] == (4, 1, 1)
        assert launch["global_read_bytes"] == x.numel() * 4  # no pos: x once


def strided_x(B, C, H, W, dtype):
    """A view with every stride odd: every other channel and column of a bigger tensor."""
    x, _ = int_inputs(B, 2 * C, H, 2 * W + 1, dtype, pos_shape=None, seed=5)
    return x[:, ::2, :, 1::2]


# (B, C, H, W, keep, layout, pos, dtype): N not a power of two, K = 1, K = N, B = 1, slices that
# leave the last blocks of the cluster with fewer or no channels (C = 13: 2 channels x 6 + 1 + 0).
CLUSTER_CASES = [
    pytest.param(2, 13, 5, 7, 11, "nchw", "3d", torch.float32, id="odd_c_n"),
    pytest.param(1, 9, 3, 3, 1, "nchw", "2d", torch.bfloat16, id="b1_keep1_bf16"),
    pytest.param(2, 8, 3, 5, 15, "nchw", "2d", torch.float16, id="keep_all_fp16"),
    pytest.param(2, 19, 3, 5, 6, "channels_last", None, torch.float32, id="channels_last_no_pos"),
    pytest.param(2, 24, 4, 5, 7, "channels_last", "2d", torch.bfloat16, id="channels_last_bf16"),
    pytest.param(2, 10, 3, 4, 5, "strided", "3d", torch.float32, id="strided"),
    pytest.param(1, 7, 1, 1, 1, "nchw", "2d", torch.float32, id="n1"),
]


@pytest.mark.parametrize("B,C,H,W,keep,layout,pos_shape,dtype", CLUSTER_CASES)
def test_cluster_kernel_odd_shapes(B, C, H, W, keep, layout, pos_shape, dtype):
    if layout == "strided":
        x = strided_x(B, C, H, W, dtype)
        _, pos = int_inputs(B, C, H, W, dtype, pos_shape)
    else:
        x, pos = int_inputs(B, C, H, W, dtype, pos_shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    tokens, index, launch = cluster_launch(x, keep, pos)
    check_against_reference(x, keep, pos, tokens, index)
    if keep < H * W:  # x read once (with keep == N nothing is scored, still one read)
        pos_bytes = 0 if pos is None else pos.numel() * pos.element_size() * (launch["grid"][0] // launch["cluster"][0])
        assert launch["global_read_bytes"] == x.numel() * x.element_size() + pos_bytes


def test_cluster_kernel_strided_pos():
    """pos as a transposed view [N, C] with channel stride N: read through its strides."""
    x, _ = int_inputs(2, 12, 3, 5)
    pos = torch.randint(-4, 5, (12, 15)).float().t()
    tokens, index, _ = cluster_launch(x, 4, pos)
    check_against_reference(x, 4, pos, tokens, index)


def test_two_pass_fallback_when_the_slices_do_not_fit():
    """sm_90, but x's channel slice does not fit the shared memory: the one-block-per-image kernel
    (channels_last: it needs no transpose tiles; the cluster kernel would need 1232 bytes)."""
    x, pos = int_inputs(2, 16, 5, 7)
    x = x.contiguous(memory_format=torch.channels_last)
    emu.set_shared_memory_limit(1024)
    _emulation.reset_counters()
    tokens, index = apkernels.patch_pool(x, 9, pos, backend="cuda")
    assert [c["kernel"].split("<")[0] for c in _emulation.counters()] == ["patch_pool_kernel"]
    check_against_reference(x, 9, pos, tokens, index)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_two_pass_fallback_before_sm90(channels_last):
    before_sm90()
    x, pos = int_inputs(3, 13, 5, 7, torch.bfloat16, seed=2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for score in reference.PATCH_SCORES:
        _emulation.reset_counters()
        tokens, index = apkernels.patch_pool(x, 11, pos, score=score, backend="cuda")
        (launch,) = _emulation.counters()
        assert launch["kernel"].startswith("patch_pool_kernel") and launch["cluster"] == (1, 1, 1)
        check_against_reference(x, 11, pos, tokens, index, score)


# ---- the checks: mutated kernels are reported ----------------------------------------------------

ERROR_NAMES = r"kernel .*block \(\d+,\d+,\d+\)( \(cluster rank \d+\))?, thread \(\d+,\d+,\d+\)"


def run_patch_pool(channels_last=False, cluster=True):
    x, keep, pos = small_patch_case(channels_last)
    if not cluster:
        before_sm90()
    apkernels.patch_pool(x, keep, pos, backend="cuda")


def test_clean_kernels_report_nothing():
    run_every_op()


def test_removed_syncthreads_is_a_race():
    # The barrier between clearing the selection histogram and the atomics that fill it.
    line = source_line("helpers.cuh", "sh.hist[i] = 0u;", after=1)
    emu.set_mutation("skip_syncthreads", "helpers.cuh", line)
    with pytest.raises(RuntimeError, match="shared-memory data race in " + ERROR_NAMES + r".* at address 0x"):
        run_patch_pool()
    assert emu.mutation_hits() > 0


def test_syncthreads_skipped_by_some_warps_is_reported():
    # The selection's last barrier: the odd warps run on to the end of the kernel without it.
    line = source_line("helpers.cuh", "warp_counts is rewritten next step")
    emu.set_mutation("divergent_syncthreads", "helpers.cuh", line)
    with pytest.raises(RuntimeError, match="__syncthreads at helpers.cuh:%d is not reached by every thread" % line):
        # The one-block-per-image kernel: its odd warps exit. (In the cluster kernel they run on to the
        # next barrier, and their reads of the kept positions are reported as races instead.)
        run_patch_pool(cluster=False)


def test_wrong_shuffle_mask_is_reported():
    line = source_line("helpers.cuh", "v = score_combine<kind, float>(v, __shfl_xor_sync(")
    emu.set_mutation("drop_mask_lane", "helpers.cuh", line)
    # Lane 31 calls with a mask without itself, or its partners read it: whichever runs first.
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync at helpers.cuh:\d+ in " + ERROR_NAMES +
                       r"(: the mask 0x7fffffff does not include the calling lane 31| reads lane 31, which is not "
                       r"in the mask 0x7fffffff)"):
        run_patch_pool(channels_last=True, cluster=False)  # a warp per position: the warp_score reduction


def test_wrong_shuffle_source_lane_gives_a_wrong_result():
    # warp_sum's butterfly reading lane (l ^ o) + 1 instead of l ^ o: every lane is in the full mask,
    # so no check can name it; DAN's spatial_pool_kernel (a warp_sum per (b, c, head)) then sums some lanes
    # twice and others not at all, and the pooled features differ from the reference.
    x, z = torch.randn(2, 5, 6, 7), torch.randn(2, 3, 4, 6, 7)  # P = 42: both halves of a warp busy
    expected = reference.dan_spatial_pool(x, z)[0]
    torch.testing.assert_close(apkernels.dan_spatial_pool(x, z, backend="cuda"), expected)  # the real kernel
    emu.set_mutation("wrong_source_lane", "helpers.cuh", source_line("helpers.cuh", "v += __shfl_xor_sync(kFullMask"))
    mutated = apkernels.dan_spatial_pool(x, z, backend="cuda")
    assert emu.mutation_hits() > 0
    assert (mutated - expected).abs().max() > 1e-3


def test_off_by_one_bound_is_reported():
    assert hasattr(ops, "pool_backward_cuda_mutant_off_by_one") and _emulation._library.has_kernel(
        "pool_backward_cuda_mutant_off_by_one", "CPU"
    ), "the off_by_one mutant was not built: update setup.py EMULATION_MUTANTS with the kernel"
    grad = torch.randn(2, 3, 5)
    index = torch.tensor([[0, 2, 4], [1, 2, 3]])
    rows, total = ops.pool_backward_cuda_emulated(grad, index, 5, True)  # the real kernel: clean
    torch.testing.assert_close(rows, reference.pool_backward(grad, index, 5, True)[0])
    # Thread 25 (u == units) runs: its row (5) is past the tile's staged slots, which the emulator
    # reports as a read of shared memory the block never wrote, before any global access.
    with pytest.raises(RuntimeError, match="read of uninitialised shared memory in kernel pool_backward_kernel"
                       + r".*block \(0,0,0\), thread \(25,0,0\): address 0x"):
        ops.pool_backward_cuda_mutant_off_by_one(grad, index, 5, True)


def test_missing_cluster_sync_is_a_distributed_shared_memory_error():
    """Without the cluster barrier after the partial scores, block rank 0 reads rank 1's partials
    before rank 1 wrote them."""
    line = source_line("patch_pool_kernel.cu", "cluster.sync();  // every block's partials")
    emu.set_mutation("skip_cluster_sync", "patch_pool_kernel.cu", line)
    with pytest.raises(RuntimeError, match=r"read of uninitialised shared memory in kernel patch_pool_cluster_kernel"
                       r".*\(cluster rank 0\), thread .* of cluster rank 1, through distributed shared memory\) was "
                       r"not written by that block"):
        run_patch_pool()
    assert emu.mutation_hits() > 0


def test_block_leaving_before_the_cluster_is_done_is_reported():
    """Without the final cluster barrier a block exits while the others still read its partials."""
    line = source_line("patch_pool_kernel.cu", "No block leaves while another may still read", after=1)
    emu.set_mutation("skip_cluster_sync", "patch_pool_kernel.cu", line)
    with pytest.raises(RuntimeError, match=r"distributed shared memory access in kernel patch_pool_cluster_kernel.* "
                       r"to cluster rank \d, whose threads have all exited"):
        run_patch_pool()


def test_single_buffered_partial_scores_are_a_distributed_shared_memory_race():
    """The compiled mutant single_buffer: one buffer of partial scores for consecutive images. The first
    block to finish an image writes the next image's partials while the others still read the
    previous ones over distributed shared memory."""
    op = "patch_pool_cuda_mutant_single_buffer"
    assert hasattr(ops, op) and _emulation._library.has_kernel(op, "CPU"), (
        "the single_buffer mutant was not built: update setup.py EMULATION_MUTANTS with the kernel")
    x, pos = int_inputs(2, 16, 5, 7)  # one cluster (the emulated device's 4 SMs), two images
    tokens, index = ops.patch_pool_cuda_emulated(x, 9, pos, "sum_abs")
    check_against_reference(x, 9, pos, tokens, index)
    with pytest.raises(RuntimeError, match=r"shared-memory data race in kernel patch_pool_cluster_kernel.*\(cluster "
                       r"rank \d\), thread .*: read of 4 bytes at address 0x[0-9a-f]+ \(shared offset \d+ of cluster "
                       r"rank \d, through distributed shared memory\) conflicts with a write by thread \(\d+,0,0\) of "
                       r"cluster rank \d since the last barrier"):
        getattr(ops, op)(x, 9, pos, "sum_abs")


# ---- counters -----------------------------------------------------------------------------------


def test_counters_measure_global_traffic():
    grad = torch.randn(2, 3, 8)
    index = torch.tensor([[0, 2, 4], [1, 2, 3]])
    _emulation.reset_counters()
    ops.pool_backward_cuda_emulated(grad, index, 6, False)
    inverse, scatter = _emulation.counters()
    assert inverse["kernel"] == "inverse_index_kernel" and scatter["kernel"].startswith("pool_backward_kernel")
    # inverse_index: reads index once, writes inv [2, 6] int32 (built in shared memory) and each
    # image's index min/max (2 x int64).
    assert inverse["global_write_distinct_bytes"] == inverse["global_write_bytes"] == 2 * 6 * 4 + 2 * 2 * 8
    assert inverse["global_read_distinct_bytes"] == inverse["global_read_bytes"] == index.numel() * 8
    # scatter: writes every row once, reads every gradient row once (and inv).
    assert scatter["global_write_distinct_bytes"] == scatter["global_write_bytes"] == 2 * 6 * 8 * 4
    assert scatter["global_read_distinct_bytes"] == grad.numel() * 4 + 2 * 6 * 4
    assert scatter["grid"][1] == 2 and scatter["block"] == (256, 1, 1)
