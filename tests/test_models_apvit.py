"""APViT (models/apvit.py): kernels vs reference at model level, official layout, pretrained
initialisation, token counts, training step, autocast and torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F

from apkernels import reference
from models import APViT, build_model
from models.classes import APVIT_AFFECTNET8_CLASSES, APVIT_RAFDB_CLASSES
from models.ir50 import IR50, IR50_UNITS
from tests.models_helpers import assert_grads_close, model_backend_params, official_keys, synthetic_state_dict
from tests.utils import DEVICES

# A small APViT for everything that does not need the paper's widths: 32x32 input -> 4x4 grid,
# keep 12 patches, then blocks keeping 12, 9, 4 patch tokens.
SMALL = dict(keep_patches=12, keep_rates=(1, 0.75, 0.5), embed_dim=48, num_heads=4, backbone_units=(1, 1, 1),
             input_size=32)
SMALL_COUNTS = [13, 10, 5]
PAPER_COUNTS = [161, 161, 161, 161, 145, 130, 117, 105]
OFFICIAL = official_keys("apvit_raf_state_dict_keys.json")


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return APViT().eval()


@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(0)
    return APViT(**SMALL, backend="reference", attention="explicit").state_dict()


def small_pair(state, backend, device):
    fast = APViT(**SMALL, backend=backend).to(device)
    ref = APViT(**SMALL, backend="reference", attention="explicit").to(device)
    fast.load_state_dict(state)
    ref.load_state_dict(state)
    return fast, ref


def small_images(batch=2, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen).to(device)


# ---- kernels vs reference -------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device,backend", model_backend_params(("patch_pool", "token_pool")))
def test_backend_matches_reference(small_state, device, backend, train):
    fast, ref = small_pair(small_state, backend, device)
    fast.train(train)
    ref.train(train)
    x_fast = small_images(device=device).requires_grad_()
    x_ref = x_fast.detach().clone().requires_grad_()
    logits_fast, pool_fast = fast(x_fast, return_pooling=True)
    logits_ref, pool_ref = ref(x_ref, return_pooling=True)

    assert torch.equal(pool_fast.patch_index, pool_ref.patch_index)
    for a, b in zip(pool_fast.token_indices, pool_ref.token_indices, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-5, rtol=1e-4)

    weights = torch.randn(logits_ref.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (logits_fast * weights).sum().backward()
    (logits_ref * weights).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    assert_grads_close(fast, ref, rel=1e-4, atol=1e-5)
    assert ref.vit.patch_pos_embed.grad.abs().sum() > 0  # gradients reach the position embedding
    if train:  # BatchNorm statistics moved identically
        torch.testing.assert_close(fast.state_dict(), ref.state_dict())


def test_pooling_indices_describe_the_kept_positions(small_state):
    model, _ = small_pair(small_state, "auto", "cpu")
    model.eval()
    captured = {}
    model.vit.projs[0].register_forward_hook(lambda m, i, out: captured.__setitem__("f", out))
    x = small_images(batch=3)
    with torch.no_grad():
        logits, pooling = model(x, return_pooling=True)
        assert torch.equal(model(x), logits)
    # APP kept the top-12 positions by sum |f| over channels, ascending.
    expected = reference.select_topk(reference.patch_scores(captured["f"], "sum_abs"), 12)
    assert torch.equal(pooling.patch_index, expected)
    assert pooling.token_indices[0] is None
    assert [i.shape for i in pooling.token_indices[1:]] == [(3, 10), (3, 5)]
    for index in pooling.token_indices[1:]:
        assert (index[:, 0] == 0).all() and (index[:, 1:].diff(dim=1) > 0).all()
    # Composing the per-block indices by hand gives the final positions.
    positions = pooling.patch_index
    for index in pooling.token_indices[1:]:
        positions = torch.stack([positions[b, index[b, 1:] - 1] for b in range(3)])
    assert torch.equal(pooling.kept_positions(), positions)
    assert torch.equal(pooling.kept_positions(after_block=0), pooling.patch_index)
    mask = pooling.kept_mask()
    assert mask.shape == (3, 4, 4) and mask.sum().item() == 3 * 4
    assert mask.flatten(1).gather(1, positions).all()


def test_keeping_every_patch_is_the_identity(small_state):
    torch.manual_seed(7)
    model = APViT(**{**SMALL, "keep_patches": 16}).eval()
    model.load_state_dict(small_state)
    captured = {}
    model.vit.blocks[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    with torch.no_grad():
        _, pooling = model(small_images(), return_pooling=True)
        f = model.vit.projs[0](model.extractor(small_images()))
    assert torch.equal(pooling.patch_index, torch.arange(16).expand(2, 16))
    tokens = f.flatten(2).transpose(1, 2) + model.vit.patch_pos_embed
    torch.testing.assert_close(captured["x"][:, 1:], tokens)
    torch.testing.assert_close(captured["x"][:, 0], (model.vit.cls_token + model.vit.cls_pos_embed)[:, 0].expand(2, -1))


# ---- paper configuration ---------------------------------------------------------------------
def test_token_counts_through_the_blocks(paper_model):
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, out: counts.append(out[0].shape[1])) for b in paper_model.vit.blocks]
    try:
        with torch.no_grad():
            logits, pooling = paper_model(torch.randn(1, 3, 112, 112), return_pooling=True)
    finally:
        for h in hooks:
            h.remove()
    assert counts == PAPER_COUNTS == paper_model.token_counts()
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    assert pooling.patch_index.shape == (1, 160) and pooling.grid == (14, 14)
    assert pooling.patch_index.max() < 196
    assert [None if i is None else i.shape[1] for i in pooling.token_indices] == [None] * 4 + PAPER_COUNTS[4:]
    assert pooling.kept_positions().shape == (1, 104)


def test_state_dict_is_the_official_layout(paper_model):
    state = paper_model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == OFFICIAL
    assert len(state) == 389
    assert paper_model.classes == APVIT_RAFDB_CLASSES


def test_official_checkpoint_round_trip(paper_model):
    official = synthetic_state_dict(OFFICIAL)
    original = {k: v.clone() for k, v in paper_model.state_dict().items()}
    try:
        report = paper_model.load_official_state_dict(official)
        assert report.ok and len(report.loaded) == 389
        torch.testing.assert_close(paper_model.official_state_dict(), official, atol=0, rtol=0)
    finally:
        paper_model.load_state_dict(original)


def test_official_checkpoint_file_with_wrapper_and_meta(tmp_path):
    model = APViT(**SMALL)
    official = synthetic_state_dict([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    checkpoint = {
        "state_dict": {"module." + k: v for k, v in official.items()},  # mmcv style, saved from DataParallel
        "meta": {"CLASSES": list(APVIT_AFFECTNET8_CLASSES[:7][::-1])},
    }
    path = tmp_path / "apvit.pth"
    torch.save(checkpoint, path)
    assert model.load_official_state_dict(str(path)).ok
    torch.testing.assert_close(model.state_dict(), official, atol=0, rtol=0)
    assert model.classes == tuple(APVIT_AFFECTNET8_CLASSES[:7][::-1])


def test_official_checkpoint_problems_are_reported():
    model = APViT(**SMALL)
    state = copy.deepcopy(model.state_dict())
    del state["head.fc.bias"]
    state["vit.unknown"] = torch.zeros(1)
    state["vit.norm.weight"] = torch.zeros(5)
    state["vit.projs.0.weight"] = state["vit.projs.0.weight"] + 1
    with pytest.raises(ValueError, match=r"1 missing: head.fc.bias[\s\S]*1 unexpected: vit.unknown[\s\S]*vit.norm.weight"):
        model.load_official_state_dict(state)
    report = model.load_official_state_dict({"state_dict": state}, strict=False)
    assert report.missing == ["head.fc.bias"] and report.unexpected == ["vit.unknown"]
    assert report.mismatched == ["vit.norm.weight: (5,) -> (48,)"]
    assert torch.equal(model.vit.projs[0].weight, state["vit.projs.0.weight"])
    with pytest.raises(ValueError, match="checkpoint must be an existing file"):
        model.load_official_state_dict("/nonexistent/apvit.pth")


# ---- pretrained initialisation ----------------------------------------------------------------
def face_evolve_checkpoint():
    """A face.evoLVe IR-50 state dict: units numbered flat body.0..23, plus the output layer."""
    torch.manual_seed(3)
    full = IR50(IR50_UNITS)
    starts = [0, 3, 7, 21]
    state = {}
    for key, value in full.state_dict().items():
        if key.startswith("body."):
            _, stage, unit, rest = key.split(".", 3)
            key = f"body.{starts[int(stage)] + int(unit)}.{rest}"
        state[key] = value.clone()
    state["output_layer.0.weight"] = torch.ones(512)
    state["output_layer.3.weight"] = torch.zeros(512, 16)
    return state


def test_load_pretrained_ir50(tmp_path):
    model = APViT(**SMALL)  # stages of one unit each: only flat units 0, 3 and 7 are used
    state = face_evolve_checkpoint()
    path = tmp_path / "backbone_ir50_ms1m_epoch120.pth"
    torch.save(state, path)
    (report,) = model.load_pretrained(ir50=str(path))
    assert report.ok
    own = model.extractor.state_dict()
    for own_key, flat_key in [("body.0.0.res_layer.1.weight", "body.0.res_layer.1.weight"),
                              ("body.1.0.shortcut_layer.0.weight", "body.3.shortcut_layer.0.weight"),
                              ("body.2.0.res_layer.4.running_var", "body.7.res_layer.4.running_var"),
                              ("input_layer.2.weight", "input_layer.2.weight")]:
        assert torch.equal(own[own_key], state[flat_key]), own_key
    assert "body.21.res_layer.1.weight" in report.ignored and "output_layer.3.weight" in report.ignored
    assert "body.1.res_layer.1.weight" in report.ignored  # unit 2 of stage 1 does not exist here


def test_load_pretrained_ir50_paper_units(paper_model):
    state = face_evolve_checkpoint()
    model = copy.deepcopy(paper_model)
    (report,) = model.load_pretrained(ir50=state)
    assert report.ok and len(report.loaded) == len(model.extractor.state_dict())
    assert torch.equal(model.extractor.body[2][13].res_layer[3].weight, state["body.20.res_layer.3.weight"])
    assert not any(k.startswith(("body.2.", "body.1.")) for k in report.ignored)
    state["body.5.res_layer.1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"mismatched: body.1.2.res_layer.1.weight: \(3,\) -> \(128, 128, 3, 3\)"):
        model.load_pretrained(ir50=state)


def timm_vit_checkpoint(model: APViT, grid: int, seed: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    dim = model.vit.cls_token.shape[-1]
    state = {
        "cls_token": torch.randn(1, 1, dim, generator=gen),
        "pos_embed": torch.randn(1, 1 + grid * grid, dim, generator=gen),
        "patch_embed.proj.weight": torch.randn(dim, 3, 16, 16, generator=gen),
        "patch_embed.proj.bias": torch.randn(dim, generator=gen),
        "norm.weight": torch.randn(dim, generator=gen),
        "norm.bias": torch.randn(dim, generator=gen),
        "head.weight": torch.randn(1000, dim, generator=gen),
        "head.bias": torch.randn(1000, generator=gen),
    }
    for key, value in model.vit.blocks.state_dict().items():
        state["blocks." + key] = torch.randn(value.shape, generator=gen)
    return state


def test_load_pretrained_vit_same_grid(tmp_path):
    model = APViT(**SMALL)
    before = copy.deepcopy(model.state_dict())
    state = timm_vit_checkpoint(model, grid=4)
    path = tmp_path / "vit_small_p16_224-15ec54c9.pth"
    torch.save(state, path)
    (report,) = model.load_pretrained(vit=str(path))
    assert report.ok
    assert sorted(report.ignored) == ["head.bias", "head.weight", "patch_embed.proj.bias", "patch_embed.proj.weight"]
    assert torch.equal(model.vit.cls_pos_embed, state["pos_embed"][:, :1])
    assert torch.equal(model.vit.patch_pos_embed, state["pos_embed"][:, 1:])
    assert torch.equal(model.vit.cls_token, state["cls_token"])
    assert torch.equal(model.vit.blocks[2].mlp.fc2.weight, state["blocks.2.mlp.fc2.weight"])
    assert torch.equal(model.vit.norm.bias, state["norm.bias"])
    for key in ("vit.projs.0.weight", "head.fc.weight", "extractor.input_layer.0.weight"):
        assert torch.equal(model.state_dict()[key], before[key]), key


def test_load_pretrained_vit_resizes_the_grid():
    model = APViT(**SMALL)  # 4x4 grid
    state = timm_vit_checkpoint(model, grid=8)
    # pos[row, col] = col on every channel: bilinear 8 -> 4 (align_corners=False) samples columns
    # 2j + 0.5 (no clamping), so the resized embedding is 2j + 0.5.
    ramp = torch.arange(8.0).repeat(8)[:, None].expand(64, 48)
    state["pos_embed"] = torch.cat([torch.full((1, 48), 7.0), ramp])[None]
    model.load_pretrained(vit=state)
    expected = (2 * torch.arange(4.0) + 0.5).repeat(4)[:, None].expand(16, 48)
    torch.testing.assert_close(model.vit.patch_pos_embed[0], expected)
    assert torch.equal(model.vit.cls_pos_embed, torch.full((1, 1, 48), 7.0))

    state["pos_embed"] = torch.randn(1, 1 + 10, 48)
    with pytest.raises(ValueError, match="not a square grid"):
        model.load_pretrained(vit=state)
    state = timm_vit_checkpoint(model, grid=4)
    state["blocks.3.norm1.weight"] = torch.ones(48)  # a deeper ViT than the model
    with pytest.raises(ValueError, match="1 unexpected: blocks.3.norm1.weight"):
        model.load_pretrained(vit=state)


# ---- training, autocast, compile ------------------------------------------------------------
def test_one_sgd_step_reduces_the_loss(small_state):
    torch.manual_seed(5)
    model, _ = small_pair(small_state, "auto", "cpu")
    model.eval()  # fixed BatchNorm statistics: the same function before and after the step
    x, y = small_images(batch=4, seed=6), torch.tensor([0, 3, 5, 6])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    with torch.no_grad():
        assert F.cross_entropy(model(x), y) < loss


AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")] + [
    pytest.param("cuda", dtype, id=f"cuda-{str(dtype)[6:]}") for dtype in (torch.float16, torch.bfloat16)
    if "cuda" in DEVICES
]


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast(small_state, device, dtype):
    fast, ref = small_pair(small_state, "auto", device)
    x = small_images(device=device)
    outputs = {}
    for name, model in (("fast", fast), ("ref", ref)):
        with torch.autocast(device, dtype=dtype):
            logits, pooling = model(x, return_pooling=True)
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        logits.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        outputs[name] = pooling
    # The backbone runs the same ops under both backends: the patch selection agrees.
    assert torch.equal(outputs["fast"].patch_index, outputs["ref"].patch_index)
    assert [i.shape[1] for i in outputs["fast"].token_indices[1:]] == SMALL_COUNTS[1:]


def test_autocast_bf16_pools_in_bf16(small_state):
    # The feature map is not promoted to fp32 before patch pooling: under bf16 autocast both pooling
    # ops receive bf16 tensors (the bf16 kernels run end to end).
    model, _ = small_pair(small_state, "auto", "cpu")
    received = []

    def record(module, args):
        received.append((type(module).__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)]))

    model.vit.patch_pool.register_forward_pre_hook(record)
    for block in model.vit.blocks:
        if block.token_pool is not None:
            block.token_pool.register_forward_pre_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(small_images())
    assert logits.dtype == torch.bfloat16
    assert received[0] == ("AttentivePatchPool", [torch.bfloat16, torch.bfloat16])
    token_pools = [dtypes for name, dtypes in received if name == "AttentiveTokenPool"]
    assert token_pools and all(d == [torch.bfloat16] * 3 for d in token_pools)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(small_state, device):
    # Inductor's C++ compile takes minutes on a small CPU runner; there aot_eager checks the same
    # full-graph capture, fake implementations and autograd registration.
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    eager, _ = small_pair(small_state, "auto", device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = small_images(device=device)
    logits, pooling = compiled(x, return_pooling=True)
    logits_eager, pooling_eager = eager(x, return_pooling=True)
    torch.testing.assert_close(logits, logits_eager, atol=1e-4, rtol=1e-4)
    assert torch.equal(pooling.kept_positions(), pooling_eager.kept_positions())
    logits.sum().backward()
    logits_eager.sum().backward()
    assert_grads_close(model, eager, rel=1e-3, atol=1e-4)


# ---- arguments --------------------------------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ValueError, match="keep_patches must be an int in"):
        APViT(keep_patches=197)
    with pytest.raises(ValueError, match="keep_rates must be"):
        APViT(**{**SMALL, "keep_rates": (1, 0)})
    with pytest.raises(ValueError, match="backend must be one of"):
        APViT(**SMALL, backend="gpu")
    model = APViT(**SMALL)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
        model(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="name must be one of"):
        build_model("resnet")
    built = build_model("APViT", num_classes=8, **SMALL)
    assert isinstance(built, APViT) and built.classes == APVIT_AFFECTNET8_CLASSES
    assert built.head.fc.out_features == 8
