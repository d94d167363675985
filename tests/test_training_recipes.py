"""The training recipes (models/recipes.py and models.train's train_epoch) step for step against
test-only restatements of the official training loops:

- DAN RAF-DB: yaoing/DAN rafdb.py (SGD 0.1, momentum 0.9, weight decay 1e-4 on the model and the
  affinity centres, StepLR(10, 0.1) after every epoch, CE + affinity (8 centres: AffinityLoss's
  default num_class) + partition);
- DAN AffectNet-8 / -7: affectnet.py (Adam 1e-4, ExponentialLR(0.6), centres = --num_class) and its
  ImbalancedDatasetSampler;
- APViT RAF-DB: configs/apvit/RAF.py run by mmcls / mmcv (DefaultOptimizerConstructor with the
  config's paramwise custom_keys, SGD 1e-3 momentum 0.9 weight decay 5e-4, OptimizerHook with
  grad_clip max_norm 10, CosineAnnealing lr hook by epoch to 0 over 40 epochs, LinearClsHead's
  zero-initialised fc and CrossEntropyLoss) and ClassBalancedDataset's repeat factors.

The official side writes every loop, loss, optimiser, parameter group and schedule out as the
official code does; the project side is exactly what `models.train` runs: TrainStep,
recipes.build_optimizer / build_scheduler / initialise and train.train_epoch, with the scheduler
stepped after each epoch. Both start from the same weights and centres, see the same batches, in
fp32 on the CPU, for more epochs than it takes to cross a change of the learning rate; the loss of
every step and every final parameter, buffer and centre agree within 1e-5 (relative, per tensor).
The official loops drive a copy of the project's model (the forward passes are compared with the
official code elsewhere: DAN with its module tree in test_models_dan): DAN at lr 0.1 from random weights is chaotic, a
rounding-level difference grows about tenfold per step, so a second forward implementation would
drown the comparison; one DAN step also runs on the official per-head module tree.
"""
import collections
import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import APViT, DAN, recipes, train
from models.modeling import TrainStep
from tests.test_losses import affinity_official
from tests.test_models_dan import OfficialDAN, official_state  # noqa: F401 (a fixture)
from tests.test_workflows import one_thread  # noqa: F401 (an autouse fixture: tiny models, one thread)

REL = 1e-5
CPU = torch.device("cpu")
DAN_SIZE = 32  # DAN is size-agnostic: 32 x 32 images give [B, 512, 1, 1] features, every loss term intact
# The paper's width (768, 8 heads: the zero-initialised head's first gradients exceed the clipping
# norm of 10 only with wide features), three blocks, a 4 x 4 patch grid.
APVIT_TINY = dict(keep_patches=12, keep_rates=(1, 0.75, 0.5), backbone_units=(1, 1, 1), input_size=32)


def batches(n, batch, size, num_classes, seed):
    """n (images, labels) batches; every batch holds at least two classes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        labels[0], labels[1] = 0, num_classes - 1
        out.append((torch.randn(batch, 3, size, size, generator=gen), labels))
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if not value.is_floating_point():
            assert torch.equal(actual[key], value), key
        else:
            assert relative_error(actual[key], value) <= REL, (key, relative_error(actual[key], value))


class Recording(nn.Module):
    """The project's TrainStep, recording the loss of every step it computes."""

    def __init__(self, step):
        super().__init__()
        self.step, self.losses = step, []

    def forward(self, images, labels):
        out = self.step(images, labels)
        self.losses.append(out[1].item())
        return out


def run_project(step, recipe, epochs):
    """models.train's loop: train_epoch over each epoch's batches, then the scheduler steps."""
    optimizer = recipes.build_optimizer(recipe, step.named_parameters())
    scheduler = recipes.build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    recording = Recording(step)
    lrs = []
    for epoch_batches in epochs:
        lrs.append(optimizer.param_groups[0]["lr"])
        train.train_epoch(recording, step, epoch_batches, optimizer, scaler, recipe, CPU, show_progress=False)
        scheduler.step()
    return recording.losses, lrs


# ---------------------------------------------------------------------------------------------
# DAN (yaoing/DAN rafdb.py, affectnet.py)
# ---------------------------------------------------------------------------------------------

class OfficialAffinityLoss(nn.Module):
    """rafdb.py / affectnet.py AffinityLoss: `num_class=8` by default, centres randn."""

    def __init__(self, num_class=8, feat_dim=512):
        super().__init__()
        self.num_class, self.feat_dim = num_class, feat_dim
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.centers = nn.Parameter(torch.randn(self.num_class, self.feat_dim))

    def forward(self, x, labels):
        x = self.gap(x).view(x.size(0), -1)
        return affinity_official(x, labels, self.centers)


def official_partition_loss(x):
    """rafdb.py / affectnet.py PartitionLoss."""
    num_head = x.size(1)
    if num_head > 1:
        var = x.var(dim=1).mean()
        return torch.log(1 + num_head / (var + sys.float_info.epsilon))
    return 0


def official_dan_run(model, criterion_af, epochs, script):
    """run_training() of rafdb.py ("rafdb") or affectnet.py ("affectnet"), validation left out (it
    runs in eval mode under no_grad and changes nothing)."""
    criterion_cls = torch.nn.CrossEntropyLoss()
    params = list(model.parameters()) + list(criterion_af.parameters())
    if script == "rafdb":
        optimizer = torch.optim.SGD(params, lr=0.1, weight_decay=1e-4, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    else:
        optimizer = torch.optim.Adam(params, 0.0001, weight_decay=0)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.6)
    losses, lrs = [], []
    for train_loader in epochs:
        model.train()
        lrs.append(optimizer.param_groups[0]["lr"])
        for imgs, targets in train_loader:
            optimizer.zero_grad()
            out, feat, heads = model(imgs)
            loss = criterion_cls(out, targets) + 1 * criterion_af(feat, targets) + 1 * official_partition_loss(heads)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
    return losses, lrs


def dan_models(state, num_classes, centres, seed=3):
    """(our DAN, official AffinityLoss) from the fixture's trunk and heads with a fresh fc / bn for
    `num_classes`, the centres drawn as the official constructor draws them."""
    torch.manual_seed(seed)
    model = DAN(num_classes=num_classes)
    official = OfficialDAN(num_class=num_classes)
    missing, unexpected = official.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("fc.", "bn."))}, strict=False)
    assert not unexpected and all(k.startswith(("fc.", "bn.")) for k in missing)
    assert model.load_official_state_dict(official.state_dict()).ok
    criterion_af = OfficialAffinityLoss(num_class=centres) if centres != 8 else OfficialAffinityLoss()
    return model, criterion_af


def our_dan_step(model, criterion_af, recipe):
    step = TrainStep("dan", model, recipe.affinity_centres)
    assert step.affinity.centers.shape == criterion_af.centers.shape
    with torch.no_grad():
        step.affinity.centers.copy_(criterion_af.centers)
    return step


@pytest.mark.parametrize("dataset,num_classes,centres,epochs,per_epoch", [
    pytest.param("rafdb", 7, 8, 11, 1, id="rafdb"),  # StepLR divides the lr by 10 after epoch 10
    pytest.param("affectnet", 8, 8, 3, 2, id="affectnet8"),
    pytest.param("affectnet", 7, 7, 3, 2, id="affectnet7"),
])
def test_dan_training_steps_equal_the_official_loop(official_state, dataset, num_classes, centres, epochs, per_epoch):
    """The official loop drives a copy of our model (its forward pass is the official one: see
    test_official_module_tree_first_step and test_models_dan): DAN at lr 0.1 from random weights is
    chaotic (a 1e-7 difference grows tenfold per step), so only a loop that computes what the
    official loop computes, operation for operation, stays within 1e-5 over 11 steps."""
    recipe = recipes.paper_recipe("dan", dataset)
    model, criterion_af = dan_models(official_state, num_classes, centres)
    official = copy.deepcopy(model)
    step = our_dan_step(model, criterion_af, recipe)
    data = batches(epochs * per_epoch, 4, DAN_SIZE, num_classes, seed=11)
    epoch_batches = [data[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)]
    eighth_centre = criterion_af.centers.detach()[-1].clone()

    expected_losses, expected_lrs = official_dan_run(official, criterion_af, epoch_batches, dataset)
    losses, lrs = run_project(step, recipe, epoch_batches)

    assert len(losses) == len(expected_losses) >= 5
    assert lrs == pytest.approx(expected_lrs, rel=1e-12) and len(set(lrs)) > 1  # across a change of the lr
    for got, want in zip(losses, expected_losses):
        assert got == pytest.approx(want, rel=REL)
    assert_states_equal(model.state_dict(), official.state_dict())
    assert relative_error(step.affinity.centers.detach(), criterion_af.centers.detach()) <= REL
    # The last centre moved although (RAF-DB) no label uses it: the spread term and weight decay.
    assert not torch.equal(step.affinity.centers.detach()[-1], eighth_centre)


def test_official_module_tree_first_step(official_state):
    """One step of rafdb.py on the official per-head module tree (networks/dan.py) and of our
    trainer on our batched model: the same loss and the same parameters after the step."""
    recipe = recipes.paper_recipe("dan", "rafdb")
    model, criterion_af = dan_models(official_state, 7, 8)
    official = OfficialDAN(num_class=7)
    official.load_state_dict(model.official_state_dict())
    step = our_dan_step(model, criterion_af, recipe)
    data = [batches(1, 4, DAN_SIZE, 7, seed=11)]
    expected_losses, _ = official_dan_run(official, criterion_af, data, "rafdb")
    losses, _ = run_project(step, recipe, data)
    assert losses == pytest.approx(expected_losses, rel=REL)
    assert_states_equal(model.official_state_dict(), official.state_dict())
    assert relative_error(step.affinity.centers.detach(), criterion_af.centers.detach()) <= REL


# ---------------------------------------------------------------------------------------------
# APViT (configs/apvit/RAF.py through mmcls / mmcv)
# ---------------------------------------------------------------------------------------------

RAF_PARAMWISE = dict(custom_keys={  # configs/apvit/RAF.py
    ".vit.pos_embed": dict(decay_mult=0.0),
    ".vit.patch_pos_embed_1": dict(decay_mult=0.),
    ".vit.patch_pos_embed": dict(decay_mult=0.),
    ".vit.cls_pos_embed": dict(decay_mult=0.),
    ".vit.cls_token": dict(decay_mult=0.),
})
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def mmcv_param_groups(model, base_lr, base_wd, paramwise_cfg):
    """mmcv DefaultOptimizerConstructor.__call__ / add_params: one group per parameter, custom_keys
    matched as substrings of f'{prefix}.{name}' (the child prefix has no leading dot), longest key
    first; bias / norm / depth-wise rules with their default multipliers of 1."""
    if hasattr(model, "module"):
        model = model.module
    custom_keys = paramwise_cfg.get("custom_keys", {})
    sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
    params = []

    def add_params(module, prefix=""):
        is_norm = isinstance(module, NORMS)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        for name, param in module.named_parameters(recurse=False):
            param_group = {"params": [param]}
            if not param.requires_grad:
                params.append(param_group)
                continue
            is_custom = False
            for key in sorted_keys:
                if key in f"{prefix}.{name}":
                    is_custom = True
                    param_group["lr"] = base_lr * custom_keys[key].get("lr_mult", 1.)
                    param_group["weight_decay"] = base_wd * custom_keys[key].get("decay_mult", 1.)
                    break
            if not is_custom:
                if name == "bias" and not is_norm:
                    param_group["lr"] = base_lr * 1.
                if is_norm:
                    param_group["weight_decay"] = base_wd * 1.
                elif is_dwconv:
                    param_group["weight_decay"] = base_wd * 1.
                elif name == "bias":
                    param_group["weight_decay"] = base_wd * 1.
            params.append(param_group)
        for child_name, child_mod in module.named_children():
            add_params(child_mod, prefix=f"{prefix}.{child_name}" if prefix else child_name)

    add_params(model)
    return params


def annealing_cos(start, end, factor, weight=1):
    """mmcv.runner.hooks.lr_updater.annealing_cos."""
    cos_out = math.cos(math.pi * factor) + 1
    return end + 0.5 * weight * (start - end) * cos_out


def official_apvit_run(model, epochs, max_epochs=40):
    """mmcv EpochBasedRunner with the RAF.py hooks: CosineAnnealingLrUpdaterHook (by epoch, min_lr 0,
    lr set before each epoch), PoolingVitClassifier.train_step (LinearClsHead: CrossEntropyLoss,
    mean over the batch through avg_factor; _parse_losses sums the 'loss' entries) and OptimizerHook
    (zero_grad, backward, clip_grad_norm_(max_norm=10, norm_type=2) over the parameters with a
    gradient, step)."""
    optimizer = torch.optim.SGD(mmcv_param_groups(model, 1e-3, 5e-4, RAF_PARAMWISE), lr=1e-3, momentum=0.9,
                                weight_decay=5e-4)
    for group in optimizer.param_groups:  # LrUpdaterHook.before_run
        group.setdefault("initial_lr", group["lr"])
    base_lr = [group["initial_lr"] for group in optimizer.param_groups]
    losses, lrs, norms = [], [], []
    for epoch, data_loader in enumerate(epochs):
        for group, lr in zip(optimizer.param_groups, [annealing_cos(b, 0., epoch / max_epochs) for b in base_lr]):
            group["lr"] = lr
        lrs.append(optimizer.param_groups[0]["lr"])
        model.train()
        for img, gt_label in data_loader:
            cls_score = model(img)
            ce_loss = 1.0 * (F.cross_entropy(cls_score, gt_label, reduction="none").sum() / len(cls_score))
            loss = sum(v for k, v in {"ce_loss": ce_loss}.items() if "loss" in k)
            optimizer.zero_grad()
            loss.backward()
            params = list(filter(lambda p: p.requires_grad and p.grad is not None, model.parameters()))
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm=10.0, norm_type=2).item())
            optimizer.step()
            losses.append(loss.item())
    return losses, lrs, norms


def test_apvit_paramwise_keys_match_nothing_so_every_parameter_decays():
    """RAF.py's custom_keys all start with '.', mmcv matches them against 'vit.cls_token' etc.:
    nothing matches, every parameter gets lr 1e-3 and weight decay 5e-4, as our recipe gives it."""
    model = APViT(**APVIT_TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = mmcv_param_groups(model, 1e-3, 5e-4, RAF_PARAMWISE)
    assert len(groups) == len(names)
    official = {names[id(g["params"][0])]: (g.get("lr", 1e-3), g.get("weight_decay", 5e-4)) for g in groups}
    assert set(official.values()) == {(1e-3, 5e-4)}
    assert {"vit.cls_token", "vit.patch_pos_embed", "vit.cls_pos_embed"} <= official.keys()
    # The restatement does apply a key that matches: without the leading dot the embeddings would be exempt.
    undotted = {"custom_keys": {k.lstrip("."): v for k, v in RAF_PARAMWISE["custom_keys"].items()}}
    exempt = {names[id(g["params"][0])] for g in mmcv_param_groups(model, 1e-3, 5e-4, undotted)
              if g.get("weight_decay") == 0.0}
    assert exempt == {"vit.cls_token", "vit.patch_pos_embed", "vit.cls_pos_embed"}

    optimizer = recipes.build_optimizer(recipes.paper_recipe("apvit", "rafdb"), model.named_parameters())
    ours = {names[id(p)]: (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"], g["dampening"])
            for g in optimizer.param_groups for p in g["params"]}
    assert ours == {name: (lr, wd, 0.9, False, 0) for name, (lr, wd) in official.items()}


def test_apvit_training_steps_equal_the_official_loop():
    recipe = recipes.paper_recipe("apvit", "rafdb")
    torch.manual_seed(0)
    model = APViT(**APVIT_TINY)
    official = copy.deepcopy(model)  # the model code the project trains; the loop around it is mmcv's
    recipes.initialise(recipe, model)
    nn.init.constant_(official.head.fc.weight, 0)  # LinearClsHead.init_weights: constant_init(fc, val=0, bias=0)
    nn.init.constant_(official.head.fc.bias, 0)
    assert torch.equal(model.head.fc.weight, official.head.fc.weight)
    epochs = 3
    # Batches of 2 and of 16 images: the small ones' gradients exceed the clipping norm, the averaged
    # large ones' do not.
    epoch_batches = [batches(1, 2, 32, 7, seed=2 * e) + batches(1, 16, 32, 7, seed=2 * e + 1) for e in range(epochs)]

    expected_losses, expected_lrs, norms = official_apvit_run(official, epoch_batches)
    losses, lrs = run_project(TrainStep("apvit", model), recipe, epoch_batches)

    assert min(norms) < 10 < max(norms)  # some steps clip, some do not
    assert len(losses) == len(expected_losses) >= 5
    assert lrs == pytest.approx(expected_lrs, rel=1e-15) and len(set(lrs)) == epochs
    for got, want in zip(losses, expected_losses):
        assert got == pytest.approx(want, rel=REL)
    assert_states_equal(model.state_dict(), official.state_dict())


def test_cosine_schedule_is_mmcv_closed_form_over_a_whole_run():
    recipe = recipes.paper_recipe("apvit", "rafdb")
    optimizer = recipes.build_optimizer(recipe, [("w", nn.Parameter(torch.zeros(1)))])
    scheduler = recipes.build_scheduler(recipe, optimizer)
    for epoch in range(recipe.epochs):
        assert optimizer.param_groups[0]["lr"] == annealing_cos(1e-3, 0.0, epoch / 40)
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    resumed = recipes.build_scheduler(recipe, recipes.build_optimizer(recipe, [("w", nn.Parameter(torch.zeros(1)))]))
    resumed.load_state_dict(state)
    assert resumed.last_epoch == recipe.epochs and resumed.get_last_lr() == scheduler.get_last_lr()


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------

SKEWED_COUNTS = {0: 600, 1: 150, 2: 70, 3: 31, 4: 9, 5: 3, 6: 1, 7: 40}


def skewed_labels(counts=SKEWED_COUNTS, seed=0):
    labels = [c for c, n in counts.items() for _ in range(n)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    return [labels[i] for i in order]


class LabelSet:
    def __init__(self, targets):
        self.targets = list(targets)

    def __len__(self):
        return len(self.targets)


def class_balanced_repeat_indices(labels, oversample_thr):
    """mmcls ClassBalancedDataset(method='sqrt') as APViT's copy computes it."""
    category_freq = collections.defaultdict(int)
    num_images = len(labels)
    for idx in range(num_images):
        for cat_id in {labels[idx]}:
            category_freq[cat_id] += 1
    for k, v in category_freq.items():
        category_freq[k] = v / num_images
    category_repeat = {cat_id: max(1.0, math.sqrt(oversample_thr / cat_freq)) for cat_id, cat_freq in category_freq.items()}
    repeat_factors = [max({category_repeat[cat_id] for cat_id in {labels[idx]}}) for idx in range(num_images)]
    repeat_indices = []
    for dataset_index, repeat_factor in enumerate(repeat_factors):
        repeat_indices.extend([dataset_index] * math.ceil(repeat_factor))
    return repeat_indices


def imbalanced_sampler_weights(labels):
    """affectnet.py ImbalancedDatasetSampler: weight 1 / (count of the sample's label)."""
    label_to_count = collections.Counter(labels)
    return torch.DoubleTensor([1.0 / label_to_count[label] for label in labels])


def test_repeat_factor_sampler_is_class_balanced_dataset():
    labels = skewed_labels()
    official = class_balanced_repeat_indices(labels, 0.15)
    assert recipes.repeat_factor_indices(labels, 0.15) == official
    repeats = collections.Counter(official)
    by_class = {c: {repeats[i] for i, label in enumerate(labels) if label == c} for c in SKEWED_COUNTS}
    assert by_class == {0: {1}, 1: {1}, 2: {2}, 3: {3}, 4: {4}, 5: {7}, 6: {12}, 7: {2}}  # ceil(sqrt(0.15 / f))
    sampler = recipes.FERSampler(LabelSet(labels), "repeat_factor", seed=1)
    sampler.set_epoch(3)
    assert len(sampler) == len(official) and sorted(sampler) == sorted(official)


@pytest.mark.parametrize("num_classes", [8, 7])
def test_balanced_sampler_is_imbalanced_dataset_sampler(num_classes):
    labels = skewed_labels()
    if num_classes == 7:  # affectnet.py: a Subset without the 8th class, weighted over the subset
        labels = [label for label in labels if label != 7]
    weights = imbalanced_sampler_weights(labels)
    sampler = recipes.FERSampler(LabelSet(labels), "balanced", seed=4)
    assert torch.equal(sampler.weights, weights) and len(sampler) == len(labels)
    # Each epoch is torch.multinomial(weights, len(dataset), replacement=True), the official draw.
    sampler.set_epoch(2)
    torch.manual_seed(4 + 2)
    assert list(sampler) == torch.multinomial(weights, len(labels), replacement=True).tolist()
    drawn = collections.Counter(labels[i] for epoch in range(20) for i in (sampler.set_epoch(epoch) or sampler))
    share = torch.tensor([drawn[c] for c in sorted(drawn)], dtype=torch.float64) / sum(drawn.values())
    assert len(drawn) == num_classes and (share - 1 / num_classes).abs().max() < 0.02  # classes drawn equally


# ---------------------------------------------------------------------------------------------
# recipes as models.train builds them
# ---------------------------------------------------------------------------------------------

def test_paper_recipes():
    dan_raf, dan_aff = recipes.paper_recipe("dan", "rafdb"), recipes.paper_recipe("dan", "affectnet")
    apvit = recipes.paper_recipe("apvit", "rafdb")
    assert (dan_raf.optimizer, dan_raf.lr, dan_raf.momentum, dan_raf.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (dan_raf.schedule, dan_raf.step_size, dan_raf.gamma, dan_raf.affinity_centres) == ("step", 10, 0.1, 8)
    assert (dan_aff.optimizer, dan_aff.lr, dan_aff.schedule, dan_aff.gamma) == ("adam", 1e-4, "exponential", 0.6)
    assert dan_aff.sampler == "balanced" and dan_aff.affinity_centres is None
    assert recipes.paper_recipe("dan", "folder").affinity_centres is None
    assert (apvit.lr, apvit.weight_decay, apvit.no_decay, apvit.clip_grad_norm) == (1e-3, 5e-4, (), 10.0)
    assert (apvit.schedule, apvit.sampler, apvit.repeat_thr, apvit.zero_head) == ("cosine", "repeat_factor", 0.15, True)
    model = DAN(num_classes=7)
    with pytest.raises(ValueError, match="affinity_centres: need at least one centre per class"):
        TrainStep("dan", model, 6)
    # DAN's AffectNet augmentation is affectnet.py's, not rafdb.py's.
    names = [type(t).__name__ for t in recipes.train_transform("dan", model, "affectnet").transforms]
    assert "RandomApply" in names and "RandomCrop" not in str(recipes.train_transform("dan", model, "affectnet"))
    assert "RandomAffine" in str(recipes.train_transform("dan", model, "affectnet"))
    assert "RandomCrop" in str(recipes.train_transform("dan", model, "rafdb"))
