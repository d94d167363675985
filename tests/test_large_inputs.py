"""Inputs past 2^31 elements on the CPU kernels: 32-bit offset arithmetic anywhere in a kernel
would wrap and read or write the wrong image. Each test reads or writes an image that starts at
element 2^31 and checks its kept positions, values and gradients against the reference run on that
image alone.

The tensors are fp16 (2 bytes an element), so one tensor past 2^31 elements is 4.3 GB: each test
needs about 5.5 GB at its peak (measured; plus 1 GiB of margin) and is skipped, saying so, when
/proc/meminfo's MemAvailable is lower. The backward ops are called directly (what autograd calls), after the forward's big input is
freed, so that the big input and the big gradient are never alive together.
"""
import gc

import pytest
import torch

import apkernels
from apkernels import reference

GiB = 1 << 30
LARGE = 1 << 31  # elements


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes, or 0 where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def require_memory(peak_bytes: int) -> None:
    need = peak_bytes + 1 * GiB  # the interpreter, the small tensors, a margin for the machine
    have = available_memory()
    if have < need:
        pytest.skip(f"needs {need / GiB:.1f} GiB of available memory for tensors past 2^31 elements, "
                    f"/proc/meminfo MemAvailable is {have / GiB:.1f} GiB")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("cpu" not in apkernels.available_backends("patch_pool", "cpu"),
                       reason="the CPU kernels are not built"),
]


@pytest.fixture(autouse=True)
def free_memory():
    yield
    gc.collect()


def test_patch_pool_past_2_31_elements():
    # x [513, 1024, 64, 64]: image 512 starts at element 512 * 2^22 = 2^31.
    B, C, H, W, keep = 513, 1024, 64, 64, 100
    N = H * W
    numel = B * C * N
    assert numel > LARGE and (B - 1) * C * N == LARGE
    require_memory(int(5.3 * GiB))  # measured peak RSS 5.2 GB: x, then the gradient rows
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(B, C, H, W, dtype=torch.float16)  # images 1..511: all ties, the lowest positions win
    last = torch.randn(C, H, W, generator=g).to(torch.float16)
    first = torch.randn(C, H, W, generator=g).to(torch.float16)
    x[-1], x[0] = last, first
    pos = torch.randn(N, C, generator=g).to(torch.float16)

    tokens, index = apkernels.patch_pool(x, keep, pos, backend="cpu")
    del x
    gc.collect()
    for b, image in ((B - 1, last), (0, first)):
        ref_tokens, ref_index = reference.patch_pool(image[None], keep, pos)
        assert torch.equal(index[b], ref_index[0]), f"image {b}: kept positions"
        assert torch.equal(tokens[b], ref_tokens[0]), f"image {b}: tokens"
    del tokens
    assert torch.equal(index[1:-1], torch.arange(keep).expand(B - 2, keep))  # ties: the lowest positions

    # Backward: dx rows [B, N, C] (past 2^31 elements) and pos's gradient (the batch sum).
    grad_tokens = torch.zeros(B, keep, C, dtype=torch.float16)
    grad_tokens[-1] = torch.randn(keep, C, generator=g).to(torch.float16)
    grad_tokens[0] = torch.randn(keep, C, generator=g).to(torch.float16)
    grad_rows, grad_pos = torch.ops.apkernels.pool_backward(grad_tokens, index, N, True)
    assert grad_rows.shape == (B, N, C) and grad_rows.numel() > LARGE
    for b in (B - 1, 0):
        want_rows, _ = reference.pool_backward(grad_tokens[b:b + 1], index[b:b + 1], N, False)
        assert torch.equal(grad_rows[b], want_rows[0]), f"image {b}: gradient rows"
    assert not any(grad_rows[b].any() for b in (1, 2, B // 2, B - 2))  # images without a gradient (a sample: fast)
    want_pos = (reference.pool_backward(grad_tokens[-1:], index[-1:], N, False)[0][0].float()
                + reference.pool_backward(grad_tokens[:1], index[:1], N, False)[0][0].float()).half()
    assert torch.equal(grad_pos, want_pos)


def test_dan_spatial_pool_past_2_31_elements():
    # z [129, 4, 16, 512, 512]: image 128 starts at element 128 * 2^24 = 2^31.
    B, C, M, C2, H, W = 129, 4, 4, 16, 512, 512
    z_numel = B * M * C2 * H * W
    assert z_numel > LARGE and (B - 1) * M * C2 * H * W == LARGE
    require_memory(int(6.5 * GiB))  # measured peak RSS 5.8 GB (z and x, then grad_z) + the saved maps s (0.5 GB)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=g).to(torch.float16)
    z = torch.zeros(B, M, C2, H, W, dtype=torch.float16)
    z[-1] = torch.randn(M, C2, H, W, generator=g).to(torch.float16)
    z[0] = torch.randn(M, C2, H, W, generator=g).to(torch.float16)
    out = apkernels.dan_spatial_pool(x, z, backend="cpu")
    for b in (B - 1, 0):
        want = reference.dan_spatial_pool(x[b:b + 1], z[b:b + 1])[0][0]
        torch.testing.assert_close(out[b], want, atol=2e-3, rtol=2e-3, msg=f"image {b}")
    assert not out[1:-1].any()  # z = 0: no attention
    del z
    gc.collect()

    # Backward: grad_z [129, 4, 16, 512, 512] is written past 2^31 elements. Every image reads one
    # z through an expanded view (the kernel takes any strides; the forward above read past 2^31).
    z_one = torch.randn(1, 1, C2, H, W, generator=g).to(torch.float16)
    z_view = z_one.expand(B, M, C2, H, W)
    grad_g = torch.randn(B, M, C, generator=g).to(torch.float16)
    s = reference.dan_spatial_attention(z_one.float()).flatten(2).expand(B, M, -1).contiguous()  # fp32 [B, M, P]
    grad_x, grad_z = torch.ops.apkernels.dan_spatial_pool_backward(grad_g, x, z_view, s)
    assert grad_z.shape == (B, M, C2, H, W) and grad_z.numel() > LARGE
    for b in (B - 1, 0):
        want_x, want_z = reference.dan_spatial_pool_backward(grad_g[b:b + 1], x[b:b + 1], z_view[b:b + 1], s[b:b + 1])
        torch.testing.assert_close(grad_x[b], want_x[0], atol=2e-3, rtol=2e-3, msg=f"image {b}: grad_x")
        torch.testing.assert_close(grad_z[b], want_z[0], atol=2e-3, rtol=2e-3, msg=f"image {b}: grad_z")
