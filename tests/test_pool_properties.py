"""Property tests (hypothesis) of the pooling ops on every fast backend: random small shapes, keeps,
scores, layouts and NaN/inf placements; the selection must equal the reference's exactly."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apkernels
from apkernels import reference
from tests.pool_cases import assert_close, assert_valid_index, op_for
from tests.utils import backend_params, dtypes_for, interpreted, small_ints


def _settings(device, backend, examples):
    return settings(
        max_examples=max(examples // 5, 3) if interpreted(device, backend) else examples,
        deadline=None,
        derandomize=True,  # reproducible in CI
        suppress_health_check=[HealthCheck.too_slow],
    )


def _specials(t, data, count_max=3):
    """Put a few NaN / +inf / -inf (in place, any strides) at positions hypothesis picks."""
    if t.numel() == 0:
        return
    for _ in range(data.draw(st.integers(0, count_max), label="specials")):
        at = torch.unravel_index(torch.tensor(data.draw(st.integers(0, t.numel() - 1))), t.shape)
        t[tuple(i.item() for i in at)] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))


@pytest.mark.parametrize("device,backend", backend_params("patch_pool"))
def test_patch_pool_properties(device, backend):
    @_settings(device, backend, 40)
    @given(data=st.data())
    def check(data):
        B, C, H, W = (data.draw(st.integers(1, hi), label=n) for n, hi in (("B", 3), ("C", 11), ("H", 5), ("W", 6)))
        N = H * W
        keep = data.draw(st.integers(1, N), label="keep")
        score = data.draw(st.sampled_from(reference.PATCH_SCORES), label="score")
        dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        x = small_ints(B, C, H, W, dtype=dtype, generator=g, low=-2, high=3)
        _specials(x, data)
        if data.draw(st.booleans(), label="channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        pos = data.draw(st.sampled_from([None, (N, C), (1, N, C)]), label="pos")
        pos = None if pos is None else small_ints(*pos, dtype=dtype, generator=g)
        x, pos = x.to(device), None if pos is None else pos.to(device)

        tokens, index = apkernels.patch_pool(x, keep, pos, score=score, backend=backend)
        ref_tokens, ref_index = reference.patch_pool(x, keep, pos, score)
        assert torch.equal(index, ref_index)
        assert_valid_index(index, keep, 0, N)
        assert_close(tokens, ref_tokens, dtype)
        if keep < N:  # the kept set only grows with keep
            _, more = apkernels.patch_pool(x, keep + 1, pos, score=score, backend=backend)
            assert all(set(a) <= set(b) for a, b in zip(index.tolist(), more.tolist()))

    check()


@pytest.mark.parametrize("device,backend", backend_params("token_pool"))
def test_token_pool_properties(device, backend):
    @_settings(device, backend, 40)
    @given(data=st.data())
    def check(data):
        B, N, C, heads, D = (
            data.draw(st.integers(lo, hi), label=n)
            for n, lo, hi in (("B", 1, 3), ("N", 2, 20), ("C", 1, 9), ("heads", 1, 4), ("D", 1, 10))
        )
        keep = data.draw(st.integers(1, N - 1), label="keep")
        score = data.draw(st.sampled_from(reference.TOKEN_SCORES), label="score")
        dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
        scale = data.draw(st.sampled_from([1.0, 0.5, 0.125, -0.25]), label="scale")
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        x = small_ints(B, N, C, dtype=dtype, generator=g)
        if data.draw(st.booleans(), label="qkv_view"):
            qkv = small_ints(B, N, 3, heads, D, dtype=dtype, generator=g, low=-2, high=3)
            _specials(qkv[:, 1:, 1], data)
            q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
        else:
            q = small_ints(B, heads, N, D, dtype=dtype, generator=g, low=-2, high=3)
            k = small_ints(B, heads, N, D, dtype=dtype, generator=g, low=-2, high=3)
            _specials(k[:, :, 1:], data)
        x, q, k = x.to(device), q.to(device), k.to(device)

        tokens, index = apkernels.token_pool(x, q, k, keep, scale=scale, score=score, backend=backend)
        ref_tokens, ref_index = reference.token_pool(x, q, k, keep, scale, score)
        assert torch.equal(index, ref_index)
        assert bool((index[:, 0] == 0).all())
        assert_valid_index(index[:, 1:], keep, 1, N)
        assert torch.equal(tokens, ref_tokens)

    check()


@pytest.mark.parametrize("device,backend", backend_params("pool_backward"))
def test_pool_backward_properties(device, backend):
    @_settings(device, backend, 30)
    @given(data=st.data())
    def check(data):
        B, C, num_rows = (data.draw(st.integers(1, hi), label=n) for n, hi in (("B", 4), ("C", 12), ("rows", 20)))
        K = data.draw(st.integers(1, num_rows), label="K")
        dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
        reduce_batch = data.draw(st.booleans(), label="reduce_batch")
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        index = torch.stack([torch.randperm(num_rows, generator=g)[:K] for _ in range(B)]).to(device)
        grad = torch.randn(B, K, C, generator=g).to(device=device, dtype=dtype)
        rows, total = op_for("pool_backward", backend, device)(grad, index, num_rows, reduce_batch)
        ref_rows, ref_total = reference.pool_backward(grad, index, num_rows, reduce_batch)
        assert torch.equal(rows, ref_rows)
        assert total.shape == ref_total.shape
        assert_close(total, ref_total, dtype)

    check()
