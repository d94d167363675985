"""apkernels.nn.MultiHeadCrossAttention vs an independent per-head copy of DAN's official code."""
import copy
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apkernels
from apkernels.nn import MultiHeadCrossAttention

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "dan_rafdb_state_dict_keys.json"


# ---------------------------------------------------------------------------- the official code
# yaoing/DAN networks/dan.py, with the sizes made arguments (512 / 256 / 32 in DAN) so tests stay small.
class SpatialAttention(nn.Module):
    def __init__(self, c=512, r=256):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(c, r, kernel_size=1), nn.BatchNorm2d(r))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(r, c, kernel_size=3, padding=1), nn.BatchNorm2d(c))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(r, c, kernel_size=(1, 3), padding=(0, 1)), nn.BatchNorm2d(c))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(r, c, kernel_size=(3, 1), padding=(1, 0)), nn.BatchNorm2d(c))
        self.relu = nn.ReLU()

    def attention_map(self, x):
        y = self.conv1x1(x)
        y = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        return y.sum(dim=1, keepdim=True)

    def forward(self, x):
        return x * self.attention_map(x)


class ChannelAttention(nn.Module):
    def __init__(self, c=512, hidden=32):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.attention = nn.Sequential(
            nn.Linear(c, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c), nn.Sigmoid()
        )

    def forward(self, sa):
        sa = self.gap(sa)
        sa = sa.view(sa.size(0), -1)
        y = self.attention(sa)
        return sa * y


class CrossAttentionHead(nn.Module):
    def __init__(self, c=512, r=256, hidden=32):
        super().__init__()
        self.sa = SpatialAttention(c, r)
        self.ca = ChannelAttention(c, hidden)

    def forward(self, x):
        return self.ca(self.sa(x))


class OfficialHeads(nn.Module):
    """The `cat_head{m}` part of the official DAN.forward, with log_softmax fusion."""

    def __init__(self, c=512, num_head=4, r=256, hidden=32):
        super().__init__()
        self.num_head = num_head
        for i in range(num_head):
            setattr(self, "cat_head%d" % i, CrossAttentionHead(c, r, hidden))

    def forward(self, x):
        heads = torch.stack([getattr(self, "cat_head%d" % i)(x) for i in range(self.num_head)]).permute([1, 0, 2])
        if heads.size(1) > 1:
            heads = F.log_softmax(heads, dim=1)
        return heads.sum(dim=1), heads


def randomise_(module, generator):
    """Every parameter and BN buffer random (running_var positive), so no statistic is trivial; the
    BatchNorms trained in lockstep, so their num_batches_tracked are equal."""
    steps = int(torch.randint(1, 100, (), generator=generator))
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(steps)
            elif name.endswith("running_var") or (name.endswith("1.weight") and t.dim() == 1):
                t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float64) * 0.3)
    return module


def pair(c, m, r, hidden, dtype=torch.float64, seed=0, backend="reference"):
    """(official, batched) with the same random weights, loaded through the official keys."""
    gen = torch.Generator().manual_seed(seed)
    official = randomise_(OfficialHeads(c, m, r, hidden).to(dtype), gen)
    batched = MultiHeadCrossAttention(c, m, r, hidden, backend=backend).to(dtype)
    result = batched.load_official_state_dict(official.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    return official, batched


def grads_in_official_layout(module):
    """The batched module's parameter gradients, mapped onto the official keys."""
    holder = copy.deepcopy(module)
    with torch.no_grad():
        for p_hold, p in zip(holder.parameters(), module.parameters()):
            p_hold.copy_(p.grad)
    return holder.official_state_dict()


def assert_state_equal(official_sd, batched_sd, **tol):
    assert list(official_sd) == list(batched_sd)
    for key in official_sd:
        torch.testing.assert_close(batched_sd[key], official_sd[key], msg=lambda m: f"{key}: {m}", **tol)


# ---------------------------------------------------------------------------- train / eval equivalence
@pytest.mark.parametrize("c,m,r,hidden,b,h,w", [(9, 3, 6, 4, 4, 5, 6), (8, 1, 3, 2, 3, 3, 4), (6, 2, 4, 3, 2, 1, 1)])
def test_train_step_matches_official(c, m, r, hidden, b, h, w):
    """Train mode: outputs, input / parameter grads, and the state after an SGD step (running stats)."""
    official, batched = pair(c, m, r, hidden)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=gen)
    grad_fused = torch.randn(b, c, dtype=torch.float64, generator=gen)
    grad_heads = torch.randn(b, m, c, dtype=torch.float64, generator=gen)
    outs, x_grads = [], []
    for module in (official, batched):
        module.train()
        xi = x.clone().requires_grad_()
        fused, heads = module(xi)
        torch.autograd.backward((fused, heads), (grad_fused, grad_heads))
        outs.append((fused, heads))
        x_grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(x_grads[1], x_grads[0])
    official_grads = {k: p.grad for k, p in official.named_parameters()}
    batched_grads = {k: v for k, v in grads_in_official_layout(batched).items() if k in official_grads}
    assert_state_equal(official_grads, batched_grads)
    for module in (official, batched):
        torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9).step()
    assert_state_equal(official.state_dict(), batched.official_state_dict())


@pytest.mark.parametrize("b", [1, 3])
def test_eval_matches_official_and_fused(b):
    official, batched = pair(7, 3, 5, 4)
    x = torch.randn(b, 7, 4, 3, dtype=torch.float64)
    official.eval(), batched.eval()
    want = official(x)
    torch.testing.assert_close(batched(x), want)
    s_official = torch.cat([getattr(official, f"cat_head{i}").sa.attention_map(x) for i in range(3)], 1)
    torch.testing.assert_close(batched.spatial_attention(x), s_official)
    batched.fuse_for_inference()
    assert batched.is_fused
    torch.testing.assert_close(batched(x), want)
    torch.testing.assert_close(batched.spatial_attention(x), s_official)
    batched.unfuse()
    assert not batched.is_fused
    torch.testing.assert_close(batched(x), want)


def test_paper_size_fp32_fused_runs_two_convolutions(monkeypatch):
    """DAN's sizes in fp32: official vs batched vs folded, and the folded forward runs 2 convolutions."""
    torch.manual_seed(0)
    official = OfficialHeads()
    for head in range(4):  # non-trivial BN statistics, as after training
        for module in getattr(official, f"cat_head{head}").modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0, 0.1)
    official.eval()
    batched = MultiHeadCrossAttention.from_official(official.state_dict()).eval()
    assert batched.num_heads == 4 and batched.in_channels == 512
    x = torch.randn(2, 512, 7, 7)
    want = official(x)
    got = batched(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    calls = []
    real_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or real_conv2d(*a, **k))
    batched(x)
    assert len(calls) == 4
    calls.clear()
    batched.fuse_for_inference()
    fused = batched(x)
    assert len(calls) == 2
    torch.testing.assert_close(fused, got, atol=1e-4, rtol=1e-4)


def test_fused_state_rules():
    _, batched = pair(5, 2, 3, 2)
    with pytest.raises(RuntimeError, match="eval mode"):
        batched.fuse_for_inference()
    batched.eval().fuse_for_inference()
    assert dict(batched.state_dict()).keys() == dict(MultiHeadCrossAttention(5, 2, 3, 2).state_dict()).keys()
    with pytest.raises(RuntimeError, match="unfuse"):
        batched.train()
    batched.training = True  # bypassing train() must still not train on folded weights
    with pytest.raises(RuntimeError, match="unfuse"):
        batched(torch.randn(2, 5, 3, 3, dtype=torch.float64))
    batched.training = False

    # Loading new weights while fused refolds them.
    official, _ = pair(5, 2, 3, 2, seed=7)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    batched.load_official_state_dict(official.state_dict())
    torch.testing.assert_close(batched(x), official.eval()(x))
    batched.load_state_dict(MultiHeadCrossAttention.from_official(official.state_dict()).state_dict())
    torch.testing.assert_close(batched(x), official(x))
    batched.unfuse().train()
    assert batched.training and not batched.is_fused


def test_low_precision_close_to_fp32():
    official, batched = pair(16, 2, 8, 4, dtype=torch.float32)
    x = torch.randn(3, 16, 5, 5)
    want = official.eval()(x)
    for dtype in (torch.bfloat16, torch.float16):
        module = copy.deepcopy(batched).eval().to(dtype)
        fused, heads = module(x.to(dtype))
        assert fused.dtype == dtype and heads.dtype == dtype
        torch.testing.assert_close(heads.float(), want[1], atol=0.1, rtol=0.05)


def test_non_contiguous_input():
    official, batched = pair(6, 2, 4, 3)
    official.eval(), batched.eval()
    base = torch.randn(3, 6, 5, 8, dtype=torch.float64)
    for x in (base[..., ::2], base.to(memory_format=torch.channels_last), base.transpose(2, 3)):
        torch.testing.assert_close(batched(x), official(x.contiguous()))


def test_default_init_is_the_official_init_weights():
    """CrossAttentionHead.init_weights: Conv kaiming_normal_(fan_out) per head, Linear N(0, 0.001),
    biases 0, BatchNorm weight 1 / bias 0."""
    torch.manual_seed(0)
    module = MultiHeadCrossAttention()
    expected_std = {"conv1x1": (2 / 256) ** 0.5, "conv_3x3": (2 / (512 * 9)) ** 0.5,
                    "conv_1x3": (2 / (512 * 3)) ** 0.5, "conv_3x1": (2 / (512 * 3)) ** 0.5}
    for name, std in expected_std.items():
        conv = getattr(module, name)
        assert abs(conv.weight.std().item() / std - 1) < 0.05, name
        assert not conv.bias.any()
    for w in (module.ca_weight1, module.ca_weight2):
        assert abs(w.std().item() / 0.001 - 1) < 0.05
    assert not module.ca_bias1.any() and not module.ca_bias2.any()
    for bn in (module.bn1x1, module.bn_3x3, module.ca_bn):
        assert (bn.weight == 1).all() and not bn.bias.any()


# ---------------------------------------------------------------------------- official checkpoint keys
def test_official_keys_match_the_released_checkpoint():
    fixture = [(k, tuple(s)) for k, s in json.loads(FIXTURE.read_text()) if k.startswith("cat_head")]
    assert len(fixture) == 148
    ours = [(k, tuple(v.shape)) for k, v in MultiHeadCrossAttention().official_state_dict().items()]
    assert ours == fixture
    # The test's copy of the official code has the same layout (so the comparisons above mean something).
    assert [(k, tuple(v.shape)) for k, v in OfficialHeads().state_dict().items()] == fixture


def test_official_round_trip_and_prefix():
    official, batched = pair(6, 3, 4, 2, dtype=torch.float32, seed=3)
    assert_state_equal(official.state_dict(), batched.official_state_dict(), atol=0, rtol=0)
    checkpoint = {"features.0.weight": torch.zeros(1)}
    checkpoint.update({"module." + k: v for k, v in official.state_dict().items()})
    checkpoint["module.fc.weight"] = torch.zeros(7, 6)
    rebuilt = MultiHeadCrossAttention.from_official(checkpoint, prefix="module.")
    assert (rebuilt.num_heads, rebuilt.in_channels, rebuilt.reduced, rebuilt.ca_hidden) == (3, 6, 4, 2)
    assert_state_equal(batched.state_dict(), rebuilt.state_dict(), atol=0, rtol=0)
    assert list(rebuilt.official_state_dict("module.")) == [k for k in checkpoint if "cat_head" in k]


def test_load_reports_missing_and_unexpected():
    official, _ = pair(4, 2, 3, 2)
    sd = official.state_dict()
    target = MultiHeadCrossAttention(4, 3, 3, 2)  # one head more than the checkpoint
    with pytest.raises(ValueError, match=r"missing keys \(37\): \['cat_head2.sa.conv1x1.0.weight'"):
        target.load_official_state_dict(sd)
    result = target.load_official_state_dict(sd, strict=False)
    assert len(result.missing_keys) == 37 and result.unexpected_keys == []
    torch.testing.assert_close(target.official_state_dict()["cat_head1.ca.attention.3.bias"],
                               sd["cat_head1.ca.attention.3.bias"].float())

    small = MultiHeadCrossAttention(4, 1, 3, 2)
    with pytest.raises(ValueError, match=r"unexpected keys \(37\): \['cat_head1.sa.conv1x1.0.weight'"):
        small.load_official_state_dict(sd)
    assert small.load_official_state_dict(sd, strict=False).unexpected_keys[-1] == "cat_head1.ca.attention.3.bias"
    with pytest.raises(ValueError, match=r"shape mismatch:\n  cat_head0.sa.conv1x1.0.weight: checkpoint \(3, 4, 1, 1\)"):
        MultiHeadCrossAttention(4, 2, 5, 2).load_official_state_dict(sd)
    with pytest.raises(ValueError, match="no 'cat_head<m>"):
        MultiHeadCrossAttention.from_official({"fc.weight": torch.zeros(1)})
    bad = {k.replace("cat_head1", "cat_head2"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"indices must be 0..M-1, got \[0, 2\]"):
        MultiHeadCrossAttention.from_official(bad)
    with pytest.raises(ValueError, match="state_dict must be a dict"):
        target.load_official_state_dict([("a", 1)])


# ---------------------------------------------------------------------------- backends, compile, arguments
def test_reference_and_auto_backends_agree():
    _, ref = pair(8, 3, 4, 2, dtype=torch.float32)
    auto = copy.deepcopy(ref)
    auto.backend = "auto"
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    results = []
    for module in (ref, auto):
        fused, heads = module.train()(x)
        results.append((fused, heads, *torch.autograd.grad((fused.sum() + heads.square().sum()), [x, module.ca_weight1])))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def test_compile_fullgraph():
    """Train mode through aot_eager (Inductor's C++ compile would dominate the test budget on CPU);
    backend="auto" so the compiled ops path is traced wherever a fast backend is built."""
    _, module = pair(6, 2, 4, 3, dtype=torch.float32, backend="auto")
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    fused, heads = compiled(x)
    want_fused, want_heads = eager(x)
    torch.testing.assert_close((fused, heads), (want_fused, want_heads))
    grad = torch.autograd.grad(fused.sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(want_fused.sum(), x)[0])
    torch.testing.assert_close(module.bn_3x3.running_var, eager.bn_3x3.running_var)
    # The folded inference path traces as one graph too.
    module.eval().fuse_for_inference()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module, fullgraph=True, backend="aot_eager")(x),
                                   eager.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_heads": 0}, "num_heads must be a positive int"),
    ({"in_channels": 8.0}, "in_channels must be a positive int"),
    ({"reduced": True}, "reduced must be a positive int"),
    ({"ca_hidden": -1}, "ca_hidden must be a positive int"),
    ({"backend": "tpu"}, "backend must be one of"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadCrossAttention(**{"in_channels": 8, "num_heads": 2, "reduced": 4, "ca_hidden": 2, **kwargs})


def test_bad_inputs():
    module = MultiHeadCrossAttention(8, 2, 4, 2)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor \[B, C, H, W\], got \(2, 8, 3\)"):
        module(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="x must have in_channels=8 channels"):
        module(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match=r"g must have shape \[B, 2, 8\]"):
        module.channel_gate_logits(torch.randn(2, 3, 8))
    assert isinstance(apkernels.nn.MultiHeadCrossAttention(8, 2, 4, 2), nn.Module)
