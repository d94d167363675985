"""Model rows of `python -m benchmarks` and `test_bench_models.py`: APViT and DAN throughput
(images/s) for inference and for one training step (forward, cross entropy, backward, SGD step):
- "eager": the official-style modules of `benchmarks.official` (top-k, full attention matrix,
  per-head loops);
- "apkernels": `models.APViT` / `models.DAN` (apkernels ops, backend="auto"), eager;
- "compile": the same `models/` model under torch.compile;
and the APViT batch-1 latency with pooling vs without ("-nopool": every patch and token kept).

`models/` is optional: without it only the official rows run and the others are listed as skipped
with the reason. Weights are random: these rows measure speed only.

Sizes: "paper" is the papers' models (APViT 112 x 112 input, DAN 224 x 224); "tiny" (the smoke
runs) is APViT with one IR unit per stage, width 32, 2 heads, on 32 x 32 images (a 4 x 4 grid,
12 patches kept), and DAN on 32 x 32 images.
"""
import dataclasses
import time

import torch
import torch.nn.functional as F

from . import import_models, official, timing

NUM_CLASSES = 7
MODELS = ("APViT", "DAN")
MODEL_PASSES = ("infer", "train")
MODEL_PROVIDERS = ("eager", "apkernels", "compile")
TINY_APVIT = dict(backbone_units=(1, 1, 1), embed_dim=32, num_heads=2, input_size=32, keep_patches=12)
SIZES = {  # model -> (constructor keyword arguments, image size)
    "paper": {"APViT": ({}, 112), "DAN": ({}, 224)},
    "tiny": {"APViT": (TINY_APVIT, 32), "DAN": ({}, 32)},
}
PAPER_BATCH = {"APViT": 32, "DAN": 64}  # on CUDA: the op benchmarks' target batches
CPU_BATCH = 4


def models_unavailable() -> str | None:
    """None when `models/` provides APViT and DAN, else why not."""
    try:
        models = import_models()
    except Exception as exc:  # noqa: BLE001  (models/ absent or broken: report, do not fail)
        return f"models/ cannot be imported ({exc.__class__.__name__}: {exc})"
    if not all(hasattr(models, name) for name in MODELS):
        return "models/ has no APViT / DAN class"
    return None


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str  # "APViT" | "DAN" | "APViT latency"
    device: str
    batch: int
    pass_: str
    provider: str  # "eager" | "apkernels" | "compile", "-nopool" suffix for the latency rows
    size: str = "paper"

    @property
    def image_size(self) -> int:
        return SIZES[self.size]["DAN" if self.model == "DAN" else "APViT"][1]

    @property
    def shape(self) -> str:
        tiny = " tiny" if self.size == "tiny" else ""
        return f"B={self.batch} 3x{self.image_size}x{self.image_size}{tiny}"

    @property
    def paper_scale(self) -> bool:
        return self.size == "paper"

    @property
    def group(self) -> str:
        return f"{self.model} {self.shape} {self.pass_} [{self.device}]"

    def unavailable(self) -> str | None:
        if self.provider.split("-")[0] in ("apkernels", "compile"):
            why = models_unavailable()
            if why:
                return why
        if self.provider == "compile" and torch.device(self.device).type == "cpu":
            return "torch.compile of a whole model takes minutes on a CPU: timed on CUDA only"
        return None

    def build(self) -> torch.nn.Module:
        name = "DAN" if self.model == "DAN" else "APViT"
        kwargs = dict(SIZES[self.size][name][0])
        if self.provider.endswith("-nopool"):  # every patch and every token kept
            kwargs.update(keep_patches=(self.image_size // 8) ** 2, keep_rates=(1.0,) * 8)
        kind = self.provider.split("-")[0]
        if kind == "eager":
            cls = official.OfficialDAN if name == "DAN" else official.OfficialAPViT
            model = cls(NUM_CLASSES, **kwargs)
        else:
            model = getattr(import_models(), name)(num_classes=NUM_CLASSES, backend="auto", **kwargs)
        model = model.to(self.device)
        return torch.compile(model) if kind == "compile" else model


def _logits(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def step_fn(case: ModelCase):
    """(callable running one inference / training step, a description of its output)."""
    model = case.build()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=g).to(case.device)
    labels = torch.randint(0, NUM_CLASSES, (case.batch,), generator=g).to(case.device)
    if case.pass_ == "infer":
        model.eval()

        def infer():
            with torch.no_grad():
                return _logits(model(images))

        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(_logits(model(images)), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return train


def check_step(case: ModelCase, result) -> None:
    """A step's result is finite and shaped as expected (random weights: no reference values)."""
    want = (case.batch, NUM_CLASSES) if case.pass_ == "infer" else ()
    assert tuple(result.shape) == want, f"{case}: result shape {tuple(result.shape)}, expected {want}"
    assert torch.isfinite(result).all(), f"{case}: non-finite result"


def default_batch(name: str, device: str, size: str) -> int:
    """Throughput batch: B=2 for the tiny models; the paper models at B=32 APViT / 64 DAN on
    CUDA and B=4 on a CPU (where one paper-size training step already takes seconds)."""
    if size == "tiny":
        return 2
    return PAPER_BATCH[name] if torch.device(device).type == "cuda" else CPU_BATCH


def cases(device: str, size: str = "paper", batch: int | None = None) -> list:
    """Every model case on `device`: throughput rows, then the APViT batch-1 latency rows."""
    out = []
    for name in MODELS:
        b = batch or default_batch(name, device, size)
        for pass_ in MODEL_PASSES:
            out += [ModelCase(name, device, b, pass_, p, size) for p in MODEL_PROVIDERS]
    for provider in ("eager", "eager-nopool", "apkernels", "apkernels-nopool"):
        out.append(ModelCase("APViT latency", device, 1, "infer", provider, size))
    return out


def measure(case: ModelCase, reps: int) -> dict:
    fn = step_fn(case)
    measured = timing.time_fn(fn, case.device, reps=reps, min_sample_s=0.0)
    row = {
        "kind": "model",
        "op": case.model,
        "shape": case.shape,
        "batch": case.batch,
        "dtype": "fp32",
        "pass": case.pass_,
        "provider": case.provider,
        "device": case.device,
        "ms": measured.ms,
        "p20": measured.p20,
        "p80": measured.p80,
        "img_per_s": case.batch / (measured.ms * 1e-3),
        "gbps": None,
        "peak_mb": timing.peak_memory_mb(fn, case.device),
        "paper_scale": case.paper_scale,
    }
    check_step(case, fn())
    return row


def fill_speedups(rows) -> None:
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["pass"], r["device"]), []).append(r)
    for group in groups.values():
        base = {r["provider"]: r["ms"] for r in group}
        for r in group:
            r["speedup_vs_eager"] = base["eager"] / r["ms"] if "eager" in base else None
            r["speedup_vs_compile"] = base["compile"] / r["ms"] if "compile" in base else None


def run(devices, quick: bool = False, batch: int | None = None, progress=None, providers=MODEL_PROVIDERS, deadline=None):
    """Model rows for every device in `devices`, and the skipped cases with their reason.
    quick: the tiny models at B=2; else the paper models at `batch` (default 32 APViT / 64 DAN
    on CUDA, 4 on the CPU, where a paper-size step takes seconds). Only `providers` run (the
    latency rows by their provider's kind); no case starts after `deadline` (time.monotonic())."""
    rows, skipped = [], []
    for device in devices:
        is_cuda = torch.device(device).type == "cuda"
        size = "tiny" if quick else "paper"
        b = batch
        reps = 3 if quick or not is_cuda else 20
        for case in cases(device, size, b):
            if case.provider.split("-")[0] not in providers:
                continue
            why = case.unavailable()
            if why is None and deadline is not None and time.monotonic() > deadline:
                why = "the run's deadline (--deadline-s) was reached"
            if why is not None:
                skipped.append({"op": case.model, "device": device, "provider": case.provider, "reason": why})
                continue
            if progress is not None:
                progress.set_postfix_str(f"{device} {case.model} {case.pass_} {case.provider}")
            rows.append(measure(case, reps))
            if progress is not None:
                progress.update(1)
    fill_speedups(rows)
    return rows, skipped


def pytest_params() -> list:
    """pytest.param(ModelCase) for both sizes on every device (paper size marked paper_scale)."""
    import pytest

    params = []
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            params.append(pytest.param(None, id="cuda", marks=pytest.mark.skip(reason="no CUDA device: GPU rows skipped")))
            continue
        for size in ("tiny", "paper"):
            marks = [pytest.mark.paper_scale] if size == "paper" else []
            for case in cases(device, size):
                why = case.unavailable()
                name = f"{device}-{size}-{case.model.replace(' ', '_')}-B{case.batch}-{case.pass_}-{case.provider}"
                params.append(pytest.param(case, id=name, marks=marks + ([pytest.mark.skip(reason=why)] if why else [])))
    return params


MODEL_COLUMNS = (
    ("op", "<", 14),
    ("shape", "<", 20),
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
