"""DAN (models/dan.py) vs the official module tree, kernels vs reference, official layout,
pretrained initialisation, training step, autocast and torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models import DAN, AffinityLoss, PartitionLoss, build_model
from models.classes import DAN_AFFECTNET8_CLASSES, DAN_RAFDB_CLASSES
from tests.models_helpers import assert_close_to_scale, assert_grads_close, model_backend_params, official_keys
from tests.test_nn_dan import CrossAttentionHead  # the official head, copied from yaoing/DAN
from tests.utils import DEVICES

OFFICIAL = official_keys("dan_rafdb_state_dict_keys.json")
SIZE = 64  # small images: features [B, 512, 2, 2]; the model is size-agnostic


class OfficialDAN(nn.Module):
    """yaoing/DAN networks/dan.py `DAN` (without loading the MS-Celeb weights)."""

    def __init__(self, num_class=7, num_head=4):
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        self.features = nn.Sequential(*list(resnet.children())[:-2])
        self.num_head = num_head
        for i in range(num_head):
            setattr(self, "cat_head%d" % i, CrossAttentionHead())
        self.fc = nn.Linear(512, num_class)
        self.bn = nn.BatchNorm1d(num_class)

    def forward(self, x):
        x = self.features(x)
        heads = torch.stack([getattr(self, "cat_head%d" % i)(x) for i in range(self.num_head)]).permute([1, 0, 2])
        if heads.size(1) > 1:
            heads = F.log_softmax(heads, dim=1)
        out = self.bn(self.fc(heads.sum(dim=1)))
        return out, x, heads


@pytest.fixture(scope="module")
def official_state():
    """A DAN state in the official layout with moderate scales: the default initialisation with
    random BatchNorm statistics / affine parameters and non-trivial channel-attention weights. The
    spatial branches' BatchNorm scales are small so that s (a sum over 512 channels) stays O(1-10):
    with O(1) scales the heads reach 1e4 and their log-softmax becomes so ill-conditioned that fp32
    rounding alone moves the gradients by 1e-3."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    state = DAN().official_state_dict()
    for key, value in state.items():
        if ".sa.conv_" in key and key.endswith((".1.weight", ".1.bias")):
            state[key] = torch.rand(value.shape, generator=gen) * 0.02 + 0.01 * key.endswith("weight")
        elif key.endswith("running_var") or (key.endswith(".weight") and value.dim() == 1):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", ".bias")) and value.dim() == 1:
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif ".ca.attention." in key and key.endswith(".weight"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(17)
    return state


def images(batch=2, device="cpu", seed=1, size=SIZE):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def loaded_dan(state, backend="auto", device="cpu"):
    model = DAN(backend=backend)
    assert model.load_official_state_dict({"model_state_dict": state}).ok
    return model.to(device)


# ---- the official model -------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_the_official_model(official_state, train):
    # fp64: the untrained heads' outputs are large (s sums 512 channels), so fp32 rounding would
    # blur the comparison of gradients.
    official = OfficialDAN()
    official.load_state_dict(official_state)
    model = loaded_dan(official_state)
    official.train(train).double()
    model.train(train).double()
    x_official = images().double().requires_grad_()
    x_model = x_official.detach().clone().requires_grad_()
    expected = official(x_official)
    got = model(x_model)
    for name, a, b in zip(("logits", "features", "heads"), got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i, t in enumerate(expected)]
    sum((t * w).sum() for t, w in zip(expected, weights)).backward()
    sum((t * w).sum() for t, w in zip(got, weights)).backward()
    torch.testing.assert_close(x_model.grad, x_official.grad, atol=1e-9, rtol=1e-9)
    # parameter gradients, compared in the official layout
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for p_hold, p in zip(holder.parameters(), model.parameters()):
            p_hold.copy_(p.grad)
    official_grads = {k: p.grad for k, p in official.named_parameters()}
    for key, grad in holder.official_state_dict().items():
        if key in official_grads:
            torch.testing.assert_close(grad, official_grads[key], atol=1e-9, rtol=1e-9, msg=lambda m: f"{key}: {m}")
    if train:  # running statistics moved identically
        torch.testing.assert_close(model.official_state_dict(), official.state_dict(), atol=1e-12, rtol=1e-12)


def test_spatial_attention_is_the_official_map(official_state):
    official = OfficialDAN().eval()
    official.load_state_dict(official_state)
    model = loaded_dan(official_state).eval()
    x = images(batch=3, size=96)
    with torch.no_grad():
        maps = model.spatial_attention(x)
        features = official.features(x)
        expected = torch.cat([getattr(official, f"cat_head{m}").sa.attention_map(features) for m in range(4)], 1)
    assert maps.shape == (3, 4, 3, 3)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)


# ---- kernels vs reference ---------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device,backend", model_backend_params(("dan_spatial_pool", "dan_head_fusion")))
def test_backend_matches_reference(official_state, device, backend, train):
    fast = loaded_dan(official_state, backend, device).train(train)
    ref = loaded_dan(official_state, "reference", device).train(train)
    # Batch 4: with 2 samples a train-mode BatchNorm1d maps (a, b) to (+-1) and its gradient scales
    # with 1 / |a - b|, which turns fp32 rounding differences into large gradient differences.
    x_fast = images(batch=4, device=device).requires_grad_()
    x_ref = x_fast.detach().clone().requires_grad_()
    out_fast, out_ref = fast(x_fast), ref(x_ref)
    # The untrained heads span 0 to ~1e4 (log-softmax of large logits): tolerances relative to the
    # largest entry, fp32 rounding of a 512-channel sum.
    for name, a, b in zip(("logits", "features", "heads"), out_fast, out_ref, strict=True):
        assert_close_to_scale(a, b, 1e-5, name)
    # Random weights: the plain sum of train-mode BatchNorm outputs has an exactly zero gradient.
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(t.shape, generator=gen).to(device) for t in out_ref]
    sum((t * w).sum() for t, w in zip(out_fast, weights)).backward()
    sum((t * w).sum() for t, w in zip(out_ref, weights)).backward()
    assert_close_to_scale(x_fast.grad, x_ref.grad, 1e-4, "input grad")
    assert_grads_close(fast, ref, rel=1e-4, scaled=True)


def test_fused_inference_matches(official_state):
    model = loaded_dan(official_state).eval().double()  # fp64: the fold's rounding stays far below the tolerance
    x = images().double()
    with torch.no_grad():
        expected = model(x)
        got = model.fuse_for_inference()(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


# ---- official layout ---------------------------------------------------------------------------
def test_official_layout_round_trip(official_state, tmp_path):
    model = DAN()
    assert [(k, tuple(v.shape)) for k, v in model.official_state_dict().items()] == OFFICIAL
    path = tmp_path / "rafdb_epoch21_acc0.897_bacc0.8275.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in official_state.items()}, "iter": 21}, path)
    report = model.load_official_state_dict(str(path))
    assert report.ok and len(report.loaded) == 275
    torch.testing.assert_close(dict(model.official_state_dict()), official_state, atol=0, rtol=0)
    other = DAN()
    other.load_official_state_dict(model.official_state_dict())  # bare
    torch.testing.assert_close(dict(other.official_state_dict()), official_state, atol=0, rtol=0)
    assert model.classes == DAN_RAFDB_CLASSES


def test_official_checkpoint_problems_are_reported(official_state):
    state = dict(official_state)
    del state["bn.running_mean"], state["cat_head3.ca.attention.3.bias"]
    state["cat_head4.sa.conv1x1.0.weight"] = torch.zeros(256, 512, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(8, 512)
    model = DAN()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2 missing: bn.running_mean, cat_head3.ca.attention.3.bias\n"
                                         r"  2 unexpected: extra.weight, cat_head4.sa.conv1x1.0.weight\n"
                                         r"  1 mismatched: fc.weight: \(8, 512\) -> \(7, 512\)"):
        model.load_official_state_dict(state)
    torch.testing.assert_close(model.state_dict(), before, atol=0, rtol=0)  # strict: nothing copied
    report = model.load_official_state_dict(state, strict=False)
    assert not report.ok and report.missing == ["bn.running_mean", "cat_head3.ca.attention.3.bias"]
    assert torch.equal(model.official_state_dict()["cat_head1.sa.conv_3x3.0.weight"],
                       official_state["cat_head1.sa.conv_3x3.0.weight"])
    assert torch.equal(model.fc.weight, before["fc.weight"])


def test_load_pretrained_resnet18(tmp_path):
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)  # fc included, as in resnet18_msceleb.pth
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "resnet18_msceleb.pth"
    torch.save({"state_dict": state}, path)
    model = DAN()
    heads_before = copy.deepcopy(model.cross_attention.state_dict())
    (report,) = model.load_pretrained(resnet18=str(path))
    assert report.ok and sorted(report.ignored) == ["fc.bias", "fc.weight"]
    own = model.features.state_dict()
    assert len(report.loaded) == len(own)
    for own_key, tv_key in [("0.weight", "conv1.weight"), ("1.running_var", "bn1.running_var"),
                            ("4.1.conv2.weight", "layer1.1.conv2.weight"),
                            ("7.0.downsample.1.bias", "layer4.0.downsample.1.bias")]:
        assert torch.equal(own[own_key], state[tv_key]), own_key
    torch.testing.assert_close(model.cross_attention.state_dict(), heads_before, atol=0, rtol=0)
    del state["layer4.1.bn2.bias"]
    with pytest.raises(ValueError, match="1 missing: 7.1.bn2.bias"):
        model.load_pretrained(resnet18={"state_dict": state})


# ---- training, autocast, compile ------------------------------------------------------------
def test_one_sgd_step_reduces_the_loss(official_state):
    torch.manual_seed(3)
    # Train mode normalises with the batch statistics: the same function of the weights after the step.
    model = loaded_dan(official_state).train()
    affinity, partition = AffinityLoss(7, 512), PartitionLoss()
    x, y = images(batch=4, seed=4), torch.tensor([0, 2, 3, 6])

    def total_loss():
        logits, features, heads = model(x)
        return F.cross_entropy(logits, y) + affinity(features, y) + partition(heads)

    params = list(model.parameters()) + list(affinity.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss = total_loss()
    loss.backward()
    assert affinity.centers.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    optimizer.step()
    with torch.no_grad():
        assert total_loss() < loss.detach()


AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")] + [
    pytest.param("cuda", dtype, id=f"cuda-{str(dtype)[6:]}") for dtype in (torch.float16, torch.bfloat16)
    if "cuda" in DEVICES
]


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast(official_state, device, dtype):
    model = loaded_dan(official_state, device=device).train()
    x = images(device=device)
    with torch.no_grad():
        expected_features = model.features(x)
    with torch.autocast(device, dtype=dtype):
        logits, features, heads = model(x)
        loss = logits.float().sum() + PartitionLoss()(heads.float())
    assert features.dtype == dtype and torch.isfinite(logits).all() and heads.shape == (2, 4, 512)
    # The trunk computes the same function in low precision (the untrained heads amplify rounding,
    # so their outputs are only checked for finiteness).
    error = (features.float() - expected_features).norm() / expected_features.norm()
    assert error < 0.1, error  # bf16 through 20 convolutions: ~5 %
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(official_state, device):
    # Inductor's C++ compile takes minutes on a small CPU runner; there aot_eager checks the same
    # full-graph capture, fake implementations and autograd registration.
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    eager = loaded_dan(official_state, device=device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = images(batch=4, device=device)  # batch 4: see test_backend_matches_reference
    got, expected = compiled(x), eager(x)
    for name, a, b in zip(("logits", "features", "heads"), got, expected, strict=True):
        assert_close_to_scale(a, b, 1e-5, name)
    weights = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(2)).to(device)
    (got[0] * weights).sum().backward()
    (expected[0] * weights).sum().backward()
    assert_grads_close(model, eager, rel=1e-4, scaled=True)


# ---- arguments --------------------------------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        DAN(backend="gpu")
    with pytest.raises(ValueError, match="classes must name 7 classes"):
        DAN(classes=("a", "b"))
    model = build_model("DAN", num_classes=8, num_heads=2)
    assert isinstance(model, DAN) and model.classes == DAN_AFFECTNET8_CLASSES
    assert model.cross_attention.num_heads == 2 and model.fc.out_features == 8
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        model(torch.randn(2, 1, 64, 64))
