"""apkernels benchmarks: the pytest-benchmark suites (`pytest benchmarks --benchmark-only`) and the
main job (`python -m benchmarks`). See docs/benchmarks.md and benchmarks/results/README.md."""

import importlib


def import_models(submodule: str = ""):
    """The models package (or one of its modules) beside this one: `models` in the source tree,
    `apkernels.models` once installed (benchmarks is then `apkernels.benchmarks`)."""
    parent = __name__.rpartition(".")[0]
    name = f"{parent}.models" if parent else "models"
    return importlib.import_module(f"{name}.{submodule}" if submodule else name)
