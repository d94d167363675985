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
THOROUGH_ARGS ?=

BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f)
BUILD_STAMP := $(VENV)/.apkernels-built
BUILD_LOG := build/pip-install.log

.PHONY: demo test test-thorough build check-build venv bench clean

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

# The thorough property profile (tests/thorough.py): >= 1000 random shapes per op per CPU backend,
# 100 in the Triton interpreter, forward and backward; prints the counts (last run: docs/reliability.md).
test-thorough: build
	$(PY) -m tests.thorough $(THOROUGH_ARGS)

bench: build
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build *.egg-info apkernels/_C*.so apkernels/_build_config.json $(BUILD_STAMP)

# ---- The GPU machines' stack: torch 2.11.0 + triton 3.6.0 (README "Supported versions") ----------
# A second venv on Python 3.12, the GPU image's, when this machine has one (else $(PYTHON)); pip's
# cache makes a rebuild of it cheap. requirements-torch2.11.txt replaces torch/torchvision and caps numpy.
VENV211 ?= .venv211
PY211 := $(VENV211)/bin/python
PYTHON312 ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(p) -c 'import sys; print(sys.executable)' 2>/dev/null)) $(PYTHON))
TESTS_TORCH211 ?= tests/test_patch_pool.py tests/test_token_pool.py tests/test_pool_backward.py \
	tests/test_dan_spatial_pool.py tests/test_dan_head_fusion.py tests/test_api.py tests/test_triton_backend.py \
	tests/test_cuda_build.py tests/test_registry.py tests/test_gpu_check_tools.py \
	tests/test_models_apvit.py tests/test_models_dan.py tests/test_nn_dan.py

.PHONY: venv211 gpu-bundle test-torch2.11 gpu-rehearse

venv211: $(VENV211)/.requirements-installed

$(VENV211)/.requirements-installed: requirements.txt requirements-torch2.11.txt
	test -x $(PY211) || $(PYTHON312) -m venv $(VENV211)
	$(PY211) -m pip install --quiet --upgrade pip
	grep -v -E '^(torch|torchvision)==' requirements.txt | $(PY211) -m pip install --quiet -r /dev/stdin -r requirements-torch2.11.txt
	touch $@

# apkernels._C for sm_90 against torch 2.11, abi3 (loads in the GPU image's CPython 3.12), into
# .gpu-bundle/ that a device call carries; reused while csrc/ and setup.py are unchanged.
gpu-bundle: venv211
	$(PY211) tools/gpu_bundle.py build

# The op and model tests on torch 2.11 (CPU tensors, Triton interpreted), in a copy of the tree
# under build/ with the bundle's build (its CPU kernels), so that .venv's in-place build stays.
test-torch2.11: gpu-bundle
	rm -rf build/torch2.11 && $(PY211) tools/gpu_bundle.py copy-tree build/torch2.11
	cd build/torch2.11 && $(abspath $(PY211)) tools/gpu_bundle.py install --bundle $(CURDIR)/.gpu-bundle
	cd build/torch2.11 && $(abspath $(PY211)) -m pytest $(TESTS_TORCH211) -q -p no:cacheprovider $(PYTEST_ARGS)

# tools/gpu_check.sh on this machine without a GPU, in the torch 2.11 venv with the bundle.
gpu-rehearse: gpu-bundle
	tools/gpu_check.sh --rehearse
