"""Model rows of `python -m benchmarks`: APViT and DAN throughput (images/s), inference and one
training step (forward, cross entropy, backward, SGD step), for
- "eager": the official-style modules of `benchmarks.official` (top-k, full attention matrix,
  per-head loops);
- "apkernels": the models of `models/` (apkernels ops, backend="auto"), eager;
- "compile": the same `models/` model under torch.compile;
and APViT batch-1 latency with pooling vs without (every patch and token kept: "*-nopool").

`models/` is optional: without it (or when its constructors do not fit) only the official rows
run and the others are listed as skipped with the reason. Weights are random: throughput only.
"""
import inspect

import torch
import torch.nn.functional as F

from . import common, official

APVIT_IMAGE, DAN_IMAGE = 112, 224
NUM_CLASSES = 7


def _import_models():
    """(APViT class, DAN class, None) or (None, None, why)."""
    try:
        import models  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (models/ not merged, or broken: report, do not fail)
        return None, None, f"models/ cannot be imported ({exc.__class__.__name__}: {exc})"
    apvit = getattr(models, "APViT", None)
    dan = getattr(models, "DAN", None)
    if apvit is None or dan is None:
        return apvit, dan, "models/ has no APViT / DAN class"
    return apvit, dan, None


def _build(cls, **kwargs):
    """cls(**kwargs), passing only the keyword arguments its constructor accepts."""
    params = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return cls(**kwargs)


def _logits(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def model_variants(name: str, nopool: bool = False):
    """[(provider, build() -> module | None, why-not)] for APViT / DAN."""
    apvit_cls, dan_cls, why = _import_models()
    if name == "APViT":
        keep = dict(keep_patches=196, keep_rates=(1,) * 8) if nopool else {}
        suffix = "-nopool" if nopool else ""
        variants = [("eager" + suffix, lambda: official.OfficialAPViT(NUM_CLASSES, **keep), None)]
        if apvit_cls is not None:
            kwargs = dict(num_classes=NUM_CLASSES)
            if nopool:
                kwargs.update(keep_patches=196, patch_keep=196, keep_rates=(1.0,) * 8, token_keep_rates=(1.0,) * 8)
            variants.append(("apkernels" + suffix, lambda: _build(apvit_cls, **kwargs), None))
            if not nopool:
                variants.append(("compile", lambda: torch.compile(_build(apvit_cls, **kwargs)), None))
        else:
            variants += [("apkernels" + suffix, None, why)] + ([] if nopool else [("compile", None, why)])
        return variants
    variants = [("eager", lambda: official.OfficialDAN(NUM_CLASSES), None)]
    if dan_cls is not None:
        variants.append(("apkernels", lambda: _build(dan_cls, num_classes=NUM_CLASSES), None))
        variants.append(("compile", lambda: torch.compile(_build(dan_cls, num_classes=NUM_CLASSES)), None))
    else:
        variants += [("apkernels", None, why), ("compile", None, why)]
    return variants


def _step_fns(model, images, labels, pass_):
    if pass_ == "infer":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(images)

        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(_logits(model(images)), labels)
        loss.backward()
        opt.step()
        return loss

    return train


def _measure(name, shape, batch, provider, build, images, labels, pass_, device, reps):
    model = build().to(device)
    fn = _step_fns(model, images, labels, pass_)
    timing = common.time_fn(fn, device, reps=reps, min_sample_s=0.0)
    row = {
        "kind": "model",
        "op": name,
        "shape": shape,
        "batch": batch,
        "dtype": "fp32",
        "pass": pass_,
        "provider": provider,
        "device": device,
        "ms": timing.ms,
        "p20": timing.p20,
        "p80": timing.p80,
        "img_per_s": batch / (timing.ms * 1e-3),
        "gbps": None,
        "peak_mb": common.peak_memory_mb(fn, device),
        "paper_scale": False,
    }
    del model, fn
    return row


def _fill(group):
    base = {r["provider"]: r["ms"] for r in group}
    for r in group:
        r["speedup_vs_eager"] = base["eager"] / r["ms"] if "eager" in base else None
        r["speedup_vs_compile"] = base["compile"] / r["ms"] if "compile" in base else None


def run(devices, quick: bool = False, batch: int | None = None, progress=None):
    """Model rows for every device in `devices`, and the skipped variants with their reason."""
    rows, skipped = [], []
    for device in devices:
        is_cuda = torch.device(device).type == "cuda"
        reps = 3 if quick else (20 if is_cuda else 3)
        for name, size in (("APViT", APVIT_IMAGE), ("DAN", DAN_IMAGE)):
            b = batch or (2 if quick else (64 if is_cuda else 4))
            g = torch.Generator().manual_seed(0)
            images = torch.randn(b, 3, size, size, generator=g).to(device)
            labels = torch.randint(0, NUM_CLASSES, (b,), generator=g).to(device)
            shape = f"B={b} 3x{size}x{size}"
            for pass_ in ("infer", "train"):
                group = []
                for provider, build, why in model_variants(name):
                    if build is None:
                        skipped.append({"op": name, "device": device, "provider": provider, "reason": why})
                        continue
                    if provider == "compile" and not is_cuda and not quick:
                        skipped.append(
                            {
                                "op": name,
                                "device": device,
                                "provider": provider,
                                "reason": "torch.compile of a whole model takes minutes on a CPU; timed on CUDA only",
                            }
                        )
                        continue
                    group.append(_measure(name, shape, b, provider, build, images, labels, pass_, device, reps))
                _fill(group)
                rows.extend(group)
        # APViT batch-1 latency, pooling vs every token kept
        g = torch.Generator().manual_seed(1)
        image = torch.randn(1, 3, APVIT_IMAGE, APVIT_IMAGE, generator=g).to(device)
        group = []
        for nopool in (False, True):
            for provider, build, why in model_variants("APViT", nopool=nopool):
                if provider == "compile":
                    continue
                if build is None:
                    skipped.append({"op": "APViT latency", "device": device, "provider": provider, "reason": why})
                    continue
                group.append(
                    _measure("APViT latency", "B=1 3x112x112", 1, provider, build, image, None, "infer", device, reps)
                )
        _fill(group)
        rows.extend(group)
    return rows, skipped


MODEL_COLUMNS = (
    ("op", "<", 14),
    ("shape", "<", 16),
    ("dtype", "<", 5),
    ("pass", "<", 6),
    ("provider", "<", 16),
    ("ms", ">", 9),
    ("p20", ">", 9),
    ("p80", ">", 9),
    ("img_per_s", ">", 9),
    ("speedup_vs_eager", ">", 7),
    ("speedup_vs_compile", ">", 7),
    ("peak_mb", ">", 8),
)


def format_table(rows) -> str:
    from .suite import format_table as _table

    return _table(rows, MODEL_COLUMNS)
