"""The op rows of `python -m benchmarks`: run every (op, shape, dtype, pass, provider), derive
bandwidth and speed-ups, print the table, check the CPU targets, write the JSON and the chart."""
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import xml.etree.ElementTree as ET

import torch

from . import specs, timing

COLUMNS = (
    ("op", "<", 16),
    ("shape", "<", 34),
    ("dtype", "<", 5),
    ("pass", "<", 7),
    ("provider", "<", 9),
    ("ms", ">", 9),
    ("p20", ">", 9),
    ("p80", ">", 9),
    ("gbps", ">", 7),
    ("bandwidth_fraction", ">", 6),
    ("speedup_vs_eager", ">", 7),
    ("speedup_vs_compile", ">", 7),
    ("peak_mb", ">", 8),
)
HEADERS = {
    "ms": "median ms",
    "gbps": "GB/s",
    "bandwidth_fraction": "%copy",
    "speedup_vs_eager": "x eager",
    "speedup_vs_compile": "x comp",
    "peak_mb": "peak MB",
    "img_per_s": "img/s",
}


@dataclasses.dataclass
class Config:
    devices: list
    ops: list
    quick: bool = False
    reps: int | None = None
    batches: list | None = None  # overrides every op's batch sizes
    target_batch: bool = False  # each op at its CPU-target batch only
    dtypes: dict | None = None  # device type -> dtypes
    passes: tuple = specs.PASSES
    providers: tuple = specs.PROVIDERS

    def batch_sizes(self, spec) -> list:
        if self.batches:
            return list(self.batches)
        if self.target_batch:
            return [spec.target_batch]
        return [2] if self.quick else list(spec.batches)

    def dtypes_for(self, device) -> list:
        if self.dtypes and torch.device(device).type in self.dtypes:
            return self.dtypes[torch.device(device).type]
        if torch.device(device).type == "cuda":
            return [torch.float32] if self.quick else [torch.float32, torch.bfloat16]
        return [torch.float32]

    def repeats(self, device) -> int:
        if self.reps:
            return self.reps
        if self.quick:
            return 3
        return 100 if torch.device(device).type == "cuda" else 15


def _fmt(value, key) -> str:
    if value is None:
        return "n/a"
    if key in ("ms", "p20", "p80"):
        return f"{value:.4f}" if value < 1 else f"{value:.2f}"
    if key in ("gbps", "img_per_s"):
        return f"{value:.1f}"
    if key == "bandwidth_fraction":
        return f"{100 * value:.0f}%"
    if key.startswith("speedup"):
        return f"{value:.2f}x"
    if key == "peak_mb":
        return f"{value:.0f}"
    return str(value)


def format_table(rows, columns=COLUMNS) -> str:
    head = " ".join(f"{HEADERS.get(k, k):{a}{w}}" for k, a, w in columns)
    lines = [head, "-" * len(head)]
    previous = None
    for row in rows:
        group = (row["op"], row["shape"], row["dtype"], row.get("device"))
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append(" ".join(f"{_fmt(row.get(k), k):{a}{w}}" for k, a, w in columns))
    return "\n".join(lines)


def op_cases(config: Config):
    """(spec, batch, dtype, device) in run order, and the skipped combinations with their reason."""
    cases, skipped = [], []
    for device in config.devices:
        for name in config.ops:
            spec = specs.OPS[name]
            dtypes = config.dtypes_for(device)
            if torch.device(device).type == "cuda" and not torch.cuda.is_available():
                skipped.append(
                    {
                        "op": name,
                        "device": device,
                        "shapes": [spec.shape(b) for b in config.batch_sizes(spec)],
                        "dtypes": [specs.dtype_name(d) for d in dtypes],
                        "reason": "no CUDA device (torch.cuda.is_available() is False)",
                    }
                )
                continue
            for provider in config.providers:
                why = specs.provider_unavailable(name, provider, device)
                other_device = provider in ("cpu", "cuda") and provider != torch.device(device).type
                if why is not None and not other_device:
                    skipped.append({"op": name, "device": device, "provider": provider, "reason": why})
            for batch in config.batch_sizes(spec):
                for dtype in dtypes:
                    cases.append((spec, batch, dtype, device))
    return cases, skipped


def run_case(spec, batch, dtype, device, config: Config, progress=None) -> list:
    """Every pass x provider of one (op, batch, dtype, device): rows with speed-ups filled in."""
    generator = torch.Generator().manual_seed(0)
    inputs = spec.make_inputs(batch, dtype, device, generator)
    grads = specs.make_grads(spec, inputs, generator)
    providers = [p for p in config.providers if specs.provider_unavailable(spec.name, p, device) is None]
    reps = config.repeats(device)
    rows = []
    for pass_ in config.passes:
        group = []
        for provider in providers:
            if progress is not None:
                progress.set_postfix_str(f"{device} {spec.name} B={batch} {specs.dtype_name(dtype)} {pass_} {provider}")
            fn, outputs = specs.pass_fn(spec, provider, inputs, pass_, grads)
            timing.synchronize(device)
            measured = timing.time_fn(fn, device, reps=reps, min_sample_s=5e-4 if config.quick else 2e-3)
            traffic = spec.traffic(inputs, outputs, pass_)
            gbps = traffic / (measured.ms * 1e-3) / 1e9
            group.append(
                {
                    "op": spec.name,
                    "shape": spec.shape(batch),
                    "batch": batch,
                    "dtype": specs.dtype_name(dtype),
                    "pass": pass_,
                    "provider": provider,
                    "device": device,
                    "ms": measured.ms,
                    "p20": measured.p20,
                    "p80": measured.p80,
                    "gbps": gbps,
                    "traffic_bytes": traffic,
                    "peak_mb": timing.peak_memory_mb(fn, device),
                    "paper_scale": batch in spec.batches,
                }
            )
            del fn, outputs
            if progress is not None:
                progress.update(1)
        _fill_speedups(group)
        rows.extend(group)
    return rows


def _fill_speedups(group) -> None:
    base = {r["provider"]: r["ms"] for r in group}
    for r in group:
        r["speedup_vs_eager"] = base["eager"] / r["ms"] if "eager" in base else None
        r["speedup_vs_compile"] = base["compile"] / r["ms"] if "compile" in base else None


def add_bandwidth_fraction(rows, copy_gbps: dict) -> None:
    for r in rows:
        bw = copy_gbps.get(r.get("device"))
        r["bandwidth_fraction"] = r["gbps"] / bw if bw and r.get("gbps") is not None else None


def check_cpu_targets(rows) -> list:
    """The CPU targets: the fused CPU kernel >= 2x eager for each op at its target batch (forward),
    and for fwd+bwd of patch_pool and dan_spatial_pool. status: pass / FAIL / not measured."""
    results = []
    for op, pass_ in specs.CPU_TARGETS:
        spec = specs.OPS[op]
        match = [
            r
            for r in rows
            if r["op"] == op
            and r["pass"] == pass_
            and r["provider"] == "cpu"
            and r.get("device") == "cpu"
            and r["dtype"] == "fp32"
            and r.get("batch") == spec.target_batch
        ]
        entry = {"op": op, "pass": pass_, "batch": spec.target_batch, "target": specs.CPU_TARGET_SPEEDUP}
        if not match:
            why = specs.provider_unavailable(op, "cpu", "cpu")
            entry.update(
                status="not measured",
                speedup=None,
                reason=why or f"no fp32 CPU row at B={spec.target_batch} in this run",
            )
        else:
            speedup = match[0]["speedup_vs_eager"]
            entry.update(status="pass" if speedup >= specs.CPU_TARGET_SPEEDUP else "FAIL", speedup=speedup)
        results.append(entry)
    return results


def format_targets(results, enforced: bool = False) -> str:
    how = "enforced by --check" if enforced else "informative: --check makes a missed target fail the run"
    lines = [f"CPU targets (fused CPU kernel >= {specs.CPU_TARGET_SPEEDUP:.0f}x eager, fp32; {how}):"]
    for t in results:
        got = f"{t['speedup']:.2f}x" if t["speedup"] is not None else "-"
        extra = f"  ({t['reason']})" if t.get("reason") else ""
        lines.append(f"  {t['op']:<17} {t['pass']:<8} B={t['batch']:<4} {got:>7}  {t['status']}{extra}")
    return "\n".join(lines)


def missed_targets(results) -> list:
    return [t for t in results if t["status"] == "FAIL"]


def copy_bandwidth_note(rows, copy_megabytes: int) -> str | None:
    """Why a row can exceed 100 % of the copy bandwidth: its working set fits in the caches, while
    the copy reference streams a buffer much larger than any cache through main memory."""
    above = [r for r in rows if (r.get("bandwidth_fraction") or 0) > 1.0]
    if not above:
        return None
    largest = max(r.get("traffic_bytes") or 0 for r in above) / 2**20
    return (f"%copy above 100 % in {len(above)} row(s): their whole working set (at most {largest:.1f} MiB) "
            f"stays in the CPU caches between repetitions, while the copy reference streams {copy_megabytes} MiB "
            "through main memory; such rows measure cache bandwidth, not a kernel beating memory")


def format_skipped(skipped) -> str:
    lines = ["Skipped:"]
    for s in skipped:
        what = s.get("provider") or ", ".join(s.get("dtypes", []))
        shapes = f" [{'; '.join(s['shapes'])}]" if s.get("shapes") else ""
        lines.append(f"  {s.get('device', '-'):<5} {s['op']:<17} {what:<10} {s['reason']}{shapes}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- metadata
def git_sha() -> str | None:
    """HEAD's commit; else APKERNELS_GIT_SHA (a copy of the tree without .git, sent to a GPU machine)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("APKERNELS_GIT_SHA") or None


def device_label(devices) -> str:
    """File-name label of the machine: the GPU name when CUDA rows were run, else cpu-<arch>."""
    if any(torch.device(d).type == "cuda" for d in devices) and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(devices) -> str:
    parts = [f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"]
    if torch.cuda.is_available() and any(torch.device(d).type == "cuda" for d in devices):
        p = torch.cuda.get_device_properties(0)
        parts.append(f"cuda ({p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return "; ".join(parts)


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


def read_junit(path: str) -> dict:
    """{passed, failed} from a junit xml (pytest --junitxml): failed counts failures and errors."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    for s in suites:
        total += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed}


def write_json(path, rows, *, devices, copy_gbps, skipped, targets, tests=None, models=None, quick=False) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        "device": device_description(devices),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "date": now.isoformat(timespec="seconds"),
        "quick": quick,
        "copy_bandwidth_gbps": copy_gbps,
        "rows": rows,
        "skipped": skipped,
        "cpu_targets": targets,
    }
    if models is not None:
        doc["models"] = models
    if tests is not None:
        doc["tests"] = tests
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    return doc


def plot_speedups(rows, path: str, title: str) -> str | None:
    """Speed-up vs eager of every non-eager provider as horizontal bars, one panel per op and one for
    the models (two panels a row), one bar group per (shape, dtype, pass, device) inside a panel.
    Returns the path, or None when there is nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = {}  # panel title -> [(group label, {provider: speed-up})], in row order
    for r in rows:
        groups = panels.setdefault("models" if r.get("kind") == "model" else r["op"], [])
        label = f"{r['op'] + ' ' if r.get('kind') == 'model' else ''}{r['shape']} {r['dtype']} {r['pass']} [{r.get('device', '')}]"
        if not groups or groups[-1][0] != label:
            groups.append((label, {}))
        if r["provider"] != "eager" and r.get("speedup_vs_eager"):
            groups[-1][1][r["provider"]] = r["speedup_vs_eager"]
    panels = {name: [g for g in groups if g[1]] for name, groups in panels.items()}
    panels = {name: groups for name, groups in panels.items() if groups}
    if not panels:
        return None
    providers = []  # in order of first appearance, one colour each across all panels
    for groups in panels.values():
        for _, by_provider in groups:
            providers += [p for p in by_provider if p not in providers]
    colours = {p: f"C{i}" for i, p in enumerate(providers)}
    columns = min(2, len(panels))
    grid_rows = -(-len(panels) // columns)
    tallest = max(len(g) for g in panels.values())
    fig = Figure(figsize=(8 * columns, 0.8 + grid_rows * (1.0 + 0.28 * tallest)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(grid_rows, columns, squeeze=False).ravel()
    for ax, (name, groups) in zip(axes, panels.items()):
        shown = [p for p in providers if any(p in g[1] for g in groups)]
        height = 0.8 / len(shown)
        for j, provider in enumerate(shown):
            ys = [i + (j - (len(shown) - 1) / 2) * height for i in range(len(groups))]
            ax.barh(ys, [g[1].get(provider, 0) for g in groups], height=height, color=colours[provider], label=provider)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
        ax.set_ylim(len(groups) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("speed-up vs eager (higher is better)", fontsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- pytest parameters
SMOKE_BATCH = 2  # the CI smoke shape (paper feature sizes, tiny batch)


@dataclasses.dataclass(frozen=True)
class BenchCase:
    op: str
    device: str
    dtype: torch.dtype
    batch: int
    pass_: str
    provider: str

    @property
    def spec(self):
        return specs.OPS[self.op]

    @property
    def paper_scale(self) -> bool:
        return self.batch in self.spec.batches

    @property
    def group(self) -> str:
        """pytest-benchmark group: the providers of one (op, shape, dtype, pass, device) side by side."""
        return f"{self.op} {self.spec.shape(self.batch)} {specs.dtype_name(self.dtype)} {self.pass_} [{self.device}]"


def pytest_params(op: str) -> list:
    """pytest.param(BenchCase) for every (device, dtype, batch, pass, provider) of `op`; paper
    shapes carry the paper_scale mark; unavailable devices and providers are skipped params
    whose reason says why."""
    import pytest

    spec = specs.OPS[op]
    params = []
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            params.append(
                pytest.param(None, id="cuda", marks=pytest.mark.skip(reason="no CUDA device: GPU rows skipped"))
            )
            continue
        providers = []
        for provider in specs.PROVIDERS:
            why = specs.provider_unavailable(op, provider, device)
            if why is None:
                providers.append(provider)
            elif provider not in ("cpu", "cuda") or provider == device:
                params.append(pytest.param(None, id=f"{device}-{provider}", marks=pytest.mark.skip(reason=why)))
        dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
        for batch in (SMOKE_BATCH,) + tuple(spec.batches):
            marks = [pytest.mark.paper_scale] if batch in spec.batches else []
            for dtype in dtypes:
                for pass_ in specs.PASSES:
                    for provider in providers:
                        case = BenchCase(op, device, dtype, batch, pass_, provider)
                        name = f"{device}-{specs.dtype_name(dtype)}-B{batch}-{pass_}-{provider}"
                        params.append(pytest.param(case, id=name, marks=marks))
    return params
