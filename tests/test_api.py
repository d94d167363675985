"""Foundation: schemas, backend choice, argument errors, the reference ops, opcheck and compile."""
import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels import _emulation, _library, reference


def test_every_schema_exists_native_and_triton():
    for name in _library.SCHEMAS:
        for suffix in ("", _library.TRITON_SUFFIX):
            assert hasattr(torch.ops.apkernels, name + suffix), name + suffix


def test_backend_errors_name_the_problem(monkeypatch):
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        apkernels.patch_pool(x, 2, backend="tpu")
    monkeypatch.setattr(_emulation, "OPS", frozenset())  # CPU tensors run "cuda" only on the emulation build
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        apkernels.patch_pool(x, 2, backend="cuda")
    monkeypatch.undo()
    monkeypatch.setenv("APKERNELS_BACKEND", "reference")
    t, i = apkernels.patch_pool(x, 2)  # the environment variable replaces "auto"
    assert t.shape == (1, 2, 4)
    assert "reference" in apkernels.available_backends("patch_pool", "cpu")


BAD_PATCH = [
    ((torch.randn(2, 3, 4),), {"keep": 1}, "x must be 4-D"),
    ((torch.randint(0, 3, (1, 2, 2, 2)),), {"keep": 1}, "x must be a floating-point"),
    ((torch.randn(1, 2, 2, 2),), {"keep": 0}, r"keep must be in \[1, 4\]"),
    ((torch.randn(1, 2, 2, 2),), {"keep": 5}, r"keep must be in \[1, 4\]"),
    ((torch.randn(1, 2, 2, 2),), {"keep": 2.0}, "keep must be an int"),
    ((torch.randn(1, 2, 2, 2),), {"keep": 2, "pos": torch.randn(3, 2)}, "pos must have shape"),
    ((torch.randn(1, 2, 2, 2),), {"keep": 2, "pos": torch.randn(4, 2).double()}, "pos must have the same dtype"),
    ((torch.randn(1, 2, 2, 2),), {"keep": 2, "score": "mean"}, "score must be one of"),
]


@pytest.mark.parametrize("args,kwargs,message", BAD_PATCH)
def test_patch_pool_bad_arguments(args, kwargs, message):
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=message):
            apkernels.patch_pool(*args, backend=backend, **kwargs)


def test_token_pool_bad_arguments():
    x, q = torch.randn(2, 5, 8), torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"keep must be in \[1, 4\]"):
        apkernels.token_pool(x, q, q, 5, scale=0.5)
    with pytest.raises(ValueError, match="k must have shape"):
        apkernels.token_pool(x, q, torch.randn(2, 2, 6, 4), 2, scale=0.5)
    with pytest.raises(ValueError, match="q must have the same shape"):
        apkernels.token_pool(x, torch.randn(2, 3, 5, 4), q, 2, scale=0.5)
    with pytest.raises(ValueError, match="N >= 2"):
        apkernels.token_pool(x[:, :1], q[:, :, :1], q[:, :, :1], 1, scale=0.5)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        apkernels.token_pool(x, q, q, 2, scale=float("nan"))
    with pytest.raises(ValueError, match="score must be one of"):
        apkernels.token_pool(x, q, q, 2, scale=0.5, score="sum_sq")


def test_dan_bad_arguments():
    with pytest.raises(ValueError, match="z must have shape"):
        apkernels.dan_spatial_pool(torch.randn(2, 4, 3, 3), torch.randn(2, 2, 5, 3, 4))
    with pytest.raises(ValueError, match="z must have the same dtype"):
        apkernels.dan_spatial_pool(torch.randn(2, 4, 3, 3), torch.randn(2, 2, 5, 3, 3).double())
    with pytest.raises(ValueError, match="gate_logits must have the shape"):
        apkernels.dan_head_fusion(torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="g must be 3-D"):
        apkernels.dan_head_fusion(torch.randn(2, 4), torch.randn(2, 4))


def official_patch_pool(x, keep, pos):
    """APViT's own code path: topk(sorted=False), sort the indices, gather."""
    f = x.flatten(2)
    tokens = f.transpose(1, 2) + pos
    idx = f.abs().sum(1).topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    return tokens.gather(1, idx[..., None].expand(-1, -1, x.shape[1])), idx


def test_reference_patch_pool_matches_official_code():
    x, pos = torch.randn(3, 16, 7, 5), torch.randn(1, 35, 16)
    tokens, index = apkernels.patch_pool(x, 11, pos, backend="reference")
    tokens_off, index_off = official_patch_pool(x, 11, pos)
    assert torch.equal(index, index_off)
    torch.testing.assert_close(tokens, tokens_off)


def test_reference_token_pool_matches_official_code():
    B, h, N, d, C = 2, 3, 9, 4, 12
    x, qkv = torch.randn(B, N, C), torch.randn(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    scale = d**-0.5
    tokens, index = apkernels.token_pool(x, q, k, 5, scale=scale, backend="reference")
    attn = (q @ k.transpose(-2, -1)) * scale  # official: full logits, CLS row, sum over heads
    score = attn[:, :, 0, 1:].sum(1)
    top = score.topk(5, dim=1).indices.sort(dim=1).values + 1
    index_off = torch.cat([torch.zeros(B, 1, dtype=torch.long), top], 1)
    assert torch.equal(index, index_off)
    torch.testing.assert_close(tokens, x.gather(1, index_off[..., None].expand(-1, -1, C)))


def test_reference_selection_rule_ties_nan_and_signed_zero():
    s = torch.tensor([[1.0, 3.0, 3.0, float("nan"), -0.0, 0.0, float("inf"), 3.0]])
    assert reference.select_topk(s, 4).tolist() == [[1, 2, 3, 6]]  # NaN, inf, then the first two 3s
    z = torch.tensor([[-0.0, 0.0, -0.0]])
    assert reference.select_topk(z, 2).tolist() == [[0, 1]]
    full = reference.select_topk(torch.randn(2, 7), 7)
    assert torch.equal(full, torch.arange(7).expand(2, 7))


def test_reference_dan_ops_match_official_formulation():
    B, M, C, C2, H, W = 2, 3, 6, 5, 3, 4
    x, z = torch.randn(B, C, H, W), torch.randn(B, M, C2, H, W)
    heads = []
    for m in range(M):  # the official per-head loop
        s = z[:, m].relu().sum(1, keepdim=True)
        heads.append((x * s).mean((2, 3)))
    torch.testing.assert_close(apkernels.dan_spatial_pool(x, z, backend="reference"), torch.stack(heads, 1))
    _, s = reference.dan_spatial_pool(x, z)  # the saved attention maps
    torch.testing.assert_close(s, z.relu().sum(2).flatten(2))
    g, a = torch.randn(B, M, C), torch.randn(B, M, C)
    fused, h = apkernels.dan_head_fusion(g, a, backend="reference")
    expect = torch.log_softmax(g * torch.sigmoid(a), dim=1)
    torch.testing.assert_close(h, expect)
    torch.testing.assert_close(fused, expect.sum(1))
    fused1, h1 = apkernels.dan_head_fusion(g[:, :1], a[:, :1], backend="reference")
    torch.testing.assert_close(h1, g[:, :1] * torch.sigmoid(a[:, :1]))  # one head: no log-softmax


def test_reference_backward_formulas_match_autograd():
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    gg = torch.randn(2, 2, 5, dtype=torch.float64)
    out, s = reference.dan_spatial_pool(x, z)
    torch.autograd.backward(out, gg)
    gx, gz = reference.dan_spatial_pool_backward(gg, x.detach(), z.detach(), s)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gz, z.grad)
    g = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    fused, heads = reference.dan_head_fusion(g, a)
    gf, gh = torch.randn_like(fused), torch.randn_like(heads)
    torch.autograd.backward((fused, heads), (gf, gh))
    dg, da = reference.dan_head_fusion_backward(gf, gh, g.detach(), a.detach(), heads.detach())
    torch.testing.assert_close(dg, g.grad)
    torch.testing.assert_close(da, a.grad)


def op_samples():
    x = torch.randn(2, 6, 3, 5, requires_grad=True)
    pos = torch.randn(15, 6, requires_grad=True)
    xt = torch.randn(2, 7, 5, requires_grad=True)
    qkv = torch.randn(2, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)
    xs = torch.randn(2, 6, 3, 3, requires_grad=True)
    z = torch.randn(2, 4, 5, 3, 3, requires_grad=True)
    g, a = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6, requires_grad=True)
    gt, idx = torch.randn(2, 4, 6), torch.tensor([[0, 2, 3, 7], [1, 4, 5, 6]])
    return [
        ("patch_pool", (x, 4, pos, "sum_abs")),
        ("patch_pool", (x, 15, None, "max")),
        ("token_pool", (xt, qkv[0], qkv[1], 3, 0.5, "sum")),
        ("pool_backward", (gt, idx, 9, True)),
        ("pool_backward", (gt, idx, 8, False)),
        ("dan_spatial_pool", (xs, z)),
        ("dan_spatial_pool_backward", (torch.randn(2, 4, 6), xs.detach(), z.detach(), z.detach().relu().sum(2).flatten(2))),
        ("dan_head_fusion", (g, a)),
        ("dan_head_fusion_backward", (torch.randn(2, 6), torch.randn(2, 4, 6), g.detach(), a.detach(), g.detach())),
    ]


@pytest.mark.parametrize("name,args", op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_cpu_dispatch(name, args):
    """torch.ops.apkernels.<op> on CPU tensors: the compiled kernel, or the reference fallback."""
    opcheck(getattr(torch.ops.apkernels, name).default, args)


def test_compile_fullgraph_reference_backend():
    x, pos = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    xt, qkv = torch.randn(2, 9, 6), torch.randn(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    xs, z = torch.randn(2, 6, 3, 3), torch.randn(2, 2, 4, 3, 3)

    def f(backend):
        t, _ = apkernels.patch_pool(x, 5, pos, backend=backend)
        u, _ = apkernels.token_pool(xt, qkv[0], qkv[1], 4, scale=0.5, backend=backend)
        fused, _ = apkernels.dan_head_fusion(apkernels.dan_spatial_pool(xs, z, backend=backend), xs.mean((2, 3))[:, None].expand(-1, 2, -1), backend=backend)
        return t.sum() + u.sum() + fused.sum()

    for backend in ("reference", "auto"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        torch.testing.assert_close(compiled(backend), f(backend))


def test_auto_sends_fp64_on_cuda_to_the_reference():
    # The CUDA and Triton kernels implement fp32/fp16/bf16; fp64 CUDA tensors must not fail under "auto".
    from apkernels import _backend

    for op in apkernels.OPS:
        assert _backend.resolve(op, "auto", torch.device("cuda"), torch.float64) == "reference"
