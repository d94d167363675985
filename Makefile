# Two entry points (README quick start): `make demo` and `make test`. Both create .venv with an
# upgraded pip (the machine's pip 23 cannot build an editable extension with setuptools >= 80),
# install requirements.txt, and build apkernels._C in place against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS
# The CUDA kernels also build for the CPU emulator (apkernels._C_emulated; tests/test_cuda_emulation.py).
APKERNELS_CUDA_EMULATION ?= 1
export APKERNELS_CUDA_EMULATION
PYTEST_ARGS ?=

.PHONY: demo test build venv bench clean

venv: $(VENV)/.requirements-installed

$(VENV)/.requirements-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

build: venv
	$(PY) -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3

demo: build
	$(PY) -m apkernels
	$(PY) -m benchmarks

# The unit tests, then the benchmark suites and the main benchmark job as smoke tests (no timing).
test: build
	$(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
	$(PY) -m benchmarks --quick --out "$$(mktemp -d)"

bench: build
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build *.egg-info apkernels/_C*.so apkernels/_build_config.json
