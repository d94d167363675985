"""Empty batches (B = 0) and empty index rows (K = 0): every op, forward and backward, on every
backend that runs here, the nn modules and both models give empty outputs of the right shape and
dtype (as PyTorch's own ops do), never an error. A photo without a face is such a batch."""
import pytest
import torch
from torch.library import opcheck

import apkernels
from apkernels.nn import AttentivePatchPool, AttentiveTokenPool, MultiHeadCrossAttention
from models import APViT, DAN
from tests.pool_cases import op_for
from tests.utils import DEVICES

OPS = ("patch_pool", "token_pool", "dan_spatial_pool", "dan_head_fusion")
# The backward ops pair with their forward op's backend: "<op>_backward" (+ "_triton").
BACKWARD_OF = {"patch_pool": "pool_backward", "token_pool": "pool_backward",
               "dan_spatial_pool": "dan_spatial_pool_backward", "dan_head_fusion": "dan_head_fusion_backward"}
TINY_APVIT = dict(embed_dim=16, num_heads=2, mlp_ratio=2, backbone_units=(1, 1, 1), input_size=32,
                  keep_patches=3, keep_rates=(1, 0.5))


def every_backend(op):
    """(device, backend) for every backend `op` runs on here: reference, cpu, triton (interpreted
    on CPU tensors), cuda (a GPU, or the emulated CUDA build on CPU tensors)."""
    return [pytest.param(device, backend, id=f"{backend}-{device}")
            for device in DEVICES for backend in apkernels.available_backends(op, device)]


def dtypes(backend):
    return (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if backend in ("cpu", "reference") else ())


def empty_inputs(op, B, dtype, device):
    """Inputs of `op` with batch B (requires_grad where the op has a gradient), and its kwargs."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if op == "patch_pool":
        return (rand(B, 6, 3, 5).requires_grad_(), 4, rand(15, 6).requires_grad_()), {"score": "sum_abs"}
    if op == "token_pool":
        qkv = rand(B, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)  # strided views, as APViT's attention makes them
        return (rand(B, 7, 6).requires_grad_(), qkv[0], qkv[1], 3), {"scale": 0.5, "score": "sum"}
    if op == "dan_spatial_pool":
        return (rand(B, 6, 3, 4).requires_grad_(), rand(B, 2, 6, 3, 4).requires_grad_()), {}
    return (rand(B, 3, 6).requires_grad_(), rand(B, 3, 6).requires_grad_()), {}


def expected_shapes(op, B):
    return {"patch_pool": [(B, 4, 6), (B, 4)], "token_pool": [(B, 4, 6), (B, 4)],
            "dan_spatial_pool": [(B, 2, 6)], "dan_head_fusion": [(B, 6), (B, 3, 6)]}[op]


def as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("op", OPS)
def test_every_op_forward_and_backward_on_every_backend(op):
    """B = 0 on each backend: outputs of the right shape and dtype (int64 indices), gradients of
    each input's shape; the B = 1 run of the same inputs shows the call itself is a real one."""
    params = every_backend(op)
    assert {p.values[1] for p in params} >= {"cpu", "reference"}, "the CPU kernels are not built"
    for device, backend in (p.values for p in params):
        for dtype in dtypes(backend):
            for B in (0, 1):
                args, kwargs = empty_inputs(op, B, dtype, device)
                outs = as_list(getattr(apkernels, op)(*args, **kwargs, backend=backend))
                where = f"{op} {backend} {device} {dtype} B={B}"
                assert [tuple(o.shape) for o in outs] == expected_shapes(op, B), where
                assert outs[0].dtype == dtype and outs[0].device.type == torch.device(device).type, where
                if op in ("patch_pool", "token_pool"):
                    assert outs[1].dtype == torch.int64, where
                outs[0].sum().backward()
                for t in args:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, where


@pytest.mark.parametrize("device,backend", every_backend("patch_pool"))
def test_pool_backward_empty_batch_and_empty_index(device, backend):
    """pool_backward: B = 0 gives [0, N, C] rows and a zero [N, C] batch sum; K = 0 (no kept rows)
    gives zeros of [B, N, C]."""
    if backend == "reference":
        op = apkernels.reference.pool_backward
    else:
        op = op_for("pool_backward", backend, device)
    for dtype in dtypes(backend):
        for B, K in ((0, 3), (0, 0), (2, 0)):
            grad = torch.randn(B, K, 5).to(device=device, dtype=dtype)
            index = torch.zeros(B, K, dtype=torch.long, device=device)
            rows, total = op(grad, index, 7, True)
            assert rows.shape == (B, 7, 5) and rows.dtype == dtype and total.shape == (7, 5)
            assert not rows.any() and not total.any()
            rows, total = op(grad, index, 7, False)
            assert rows.shape == (B, 7, 5) and total.numel() == 0


@pytest.mark.parametrize("op", OPS)
def test_backward_ops_called_directly_with_empty_batches(op):
    """The backward ops as torch.compile would call them (no autograd in between)."""
    for device, backend in (p.values for p in every_backend(op)):
        if backend == "reference":
            continue
        args, kwargs = empty_inputs(op, 0, torch.float32, device)
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        outs = as_list(op_for(op, backend, device)(*args, *kwargs.values()))
        backward = op_for(BACKWARD_OF[op], backend, device)
        if op == "patch_pool":
            grads = backward(torch.zeros_like(outs[0]), outs[1], 15, True)
            assert grads[0].shape == (0, 15, 6) and grads[1].shape == (15, 6) and not grads[1].any()
        elif op == "token_pool":
            grads = backward(torch.zeros_like(outs[0]), outs[1], 7, False)
            assert grads[0].shape == (0, 7, 6)
        elif op == "dan_spatial_pool":
            assert outs[1].shape == (0, 2, 12) and outs[1].dtype == torch.float32  # the saved attention maps
            grads = backward(torch.zeros_like(outs[0]), *args, outs[1])
            assert [g.shape for g in grads] == [a.shape for a in args]
        else:
            grads = backward(torch.zeros_like(outs[0]), torch.zeros_like(outs[1]), *args, outs[1])
            assert [g.shape for g in grads] == [a.shape for a in args]


@pytest.mark.parametrize("op", OPS)
def test_opcheck_on_empty_inputs(op):
    """Schema, fake tensor, autograd registration and AOT dispatch tests of every registered op
    (native and Triton) with B = 0."""
    for device, backend in (p.values for p in every_backend(op)):
        if backend == "reference":
            continue
        args, kwargs = empty_inputs(op, 0, torch.float32, device)
        opcheck(op_for(op, backend, device).default, (*args, *kwargs.values()))


def test_error_still_names_an_empty_non_batch_dim():
    """Only the batch may be empty: zero channels stay a ValueError naming the argument."""
    with pytest.raises(ValueError, match=r"patch_pool: x must not be empty \(C, H, W >= 1"):
        apkernels.patch_pool(torch.randn(2, 0, 3, 3), 2)
    with pytest.raises(ValueError, match=r"dan_spatial_pool: z must not be empty"):
        apkernels.dan_spatial_pool(torch.randn(2, 4, 3, 3), torch.randn(2, 0, 4, 3, 3))
    with pytest.raises(ValueError, match=r"patch_pool: x must not be empty \(C, H, W >= 1"):
        torch.ops.apkernels.patch_pool(torch.randn(2, 0, 3, 3), 2, None, "sum_abs")


@pytest.mark.parametrize("device", DEVICES)
def test_nn_modules_with_empty_batches(device):
    x = torch.randn(0, 6, 3, 5, device=device, requires_grad=True)
    tokens, index = AttentivePatchPool(keep=4)(x, torch.randn(15, 6, device=device))
    assert tokens.shape == (0, 4, 6) and index.shape == (0, 4)
    tokens.sum().backward()
    assert x.grad.shape == x.shape

    t = torch.randn(0, 9, 8, device=device, requires_grad=True)
    qk = torch.randn(0, 2, 9, 4, device=device)
    tokens, index = AttentiveTokenPool(keep_rate=0.5)(t, qk, qk, scale=0.5)
    assert tokens.shape == (0, 5, 8) and index.shape == (0, 5)

    man = MultiHeadCrossAttention(in_channels=8, num_heads=2, reduced=4, ca_hidden=4).to(device)
    f = torch.randn(0, 8, 5, 5, device=device, requires_grad=True)
    for mode in ("eval", "fused"):
        man.eval()
        if mode == "fused":
            man.fuse_for_inference()
        fused, heads = man(f)
        assert fused.shape == (0, 8) and heads.shape == (0, 2, 8)
        fused.sum().backward()
        assert f.grad.shape == f.shape


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_models_classify_an_empty_batch(backend):
    """Eval mode (a photo without faces): empty logits; train mode keeps gradients flowing."""
    torch.manual_seed(0)
    apvit = APViT(backend=backend, **TINY_APVIT).eval()
    with torch.no_grad():
        logits, pooling = apvit(torch.randn(0, 3, 32, 32), return_pooling=True)
    assert logits.shape == (0, 7) and logits.dtype == torch.float32
    assert pooling.kept_positions().shape[0] == 0

    dan = DAN(backend=backend).eval()
    with torch.no_grad():
        logits, features, heads = dan(torch.randn(0, 3, 32, 32))
    assert logits.shape == (0, 7) and features.shape == (0, 512, 1, 1) and heads.shape == (0, 4, 512)

    for model in (apvit, dan):  # training: gradients of the right shape, BatchNorm statistics intact
        images = torch.randn(0, 3, 32, 32, requires_grad=True)
        out = model.train()(images)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert images.grad.shape == images.shape
        assert all(buf.isfinite().all() for buf in model.buffers() if buf.is_floating_point())
