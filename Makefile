# Two entry points (README quick start): `make demo` and `make test`. Both create .venv with an
# upgraded pip (the machine's pip 23 cannot build an editable extension with setuptools >= 80),
# install requirements.txt, and build apkernels._C in place against that torch.
#
# Every recipe runs under bash with errexit + pipefail, so a failing command (also inside a pipe)
# fails make. The build is incremental: `build` re-runs pip only when setup.py, pyproject.toml or
# a file under csrc/ changed, and ninja keeps its objects in build/, so only changed sources compile.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS
# The CUDA kernels also build for the CPU emulator (apkernels._C_emulated; tests/test_cuda_emulation.py).
APKERNELS_CUDA_EMULATION ?= 1
export APKERNELS_CUDA_EMULATION
PYTEST_ARGS ?=

BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f)
BUILD_STAMP := $(VENV)/.apkernels-built
BUILD_LOG := build/pip-install.log

.PHONY: demo test build check-build venv bench clean

venv: $(VENV)/.requirements-installed

$(VENV)/.requirements-installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

# The whole compiler output goes to $(BUILD_LOG); on failure its end is shown and make fails.
$(BUILD_STAMP): $(VENV)/.requirements-installed $(BUILD_INPUTS)
	mkdir -p build
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > $(BUILD_LOG) 2>&1 \
		|| { tail -n 40 $(BUILD_LOG); echo "make: the apkernels build failed (full log: $(BUILD_LOG))" >&2; exit 1; }
	touch $@

build: $(BUILD_STAMP) check-build

# Fails unless _C loaded with every CPU kernel, and every CUDA kernel where torch is a CUDA build
# and nvcc is on PATH (tests/test_build.py checks the same inside the test suite).
check-build: $(BUILD_STAMP)
	$(PY) -m apkernels --check-build

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
	rm -rf build *.egg-info apkernels/_C*.so apkernels/_build_config.json $(BUILD_STAMP)
