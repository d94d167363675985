"""apkernels benchmarks: the pytest-benchmark suites (`pytest benchmarks --benchmark-only`) and the
main job (`python -m benchmarks`). See docs/benchmarks.md and benchmarks/results/README.md."""
