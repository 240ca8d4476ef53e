# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs the pinned dependencies and the package (building tp_kernels._C,
#               CUDA sources included when nvcc is found), then runs the demo
#   make test   the same set-up, then the whole test suite; then the CPU tests again against a CPU-only
#               torch build in .venv-cpu (the extension must build and work there too)
#               and the build + Triton interpreter tests against the GPU machine's stack in .venv-gpu-image
#   make gpu-check  on a GPU node, with the Python and torch already there (no venv, no download): build for
#               the visible GPU, run every GPU test group and the GPU benchmarks (bench/gpu_check.py)
# Both are idempotent: stamps skip what is done; the extension rebuild is incremental (ninja, build/).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CPU_VENV := .venv-cpu
CPU_PY := $(CPU_VENV)/bin/python
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: demo test test-main test-cpu-torch test-gpu-image gpu-check bench clean

demo: $(VENV)/.built
	$(PY) -m tp_kernels.demo

test: test-main test-cpu-torch test-gpu-image

test-main: $(VENV)/.built
	$(PY) -m pytest $(PYTEST_ARGS)

# Same suite on a CPU-only torch: GPU and Triton tests skip with their reasons, the rest must pass.
test-cpu-torch: $(CPU_VENV)/.built
	cd $(CPU_VENV) && TP_KERNELS_EXPECT_CUDA_BUILD=0 bin/python -m pytest -c ../pyproject.toml --rootdir .. ../tests $(PYTEST_ARGS)

bench: $(VENV)/.built
	$(PY) bench/run_all.py

$(VENV)/.deps: requirements.txt requirements-common.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(EXT_SOURCES)
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

$(CPU_VENV)/.deps: requirements-cpu.txt requirements-common.txt
	test -x $(CPU_PY) || $(PYTHON) -m venv $(CPU_VENV)
	$(CPU_PY) -m pip install -q -r requirements-cpu.txt
	touch $@

# The CPU venv gets a regular (non-editable) install, so its tp_kernels/_C*.so lives in its own
# site-packages and does not overwrite the one the editable install in .venv keeps in the source tree.
# Its tests run from inside .venv-cpu so that `import tp_kernels` finds that install, not the tree.
$(CPU_VENV)/.built: $(CPU_VENV)/.deps $(EXT_SOURCES) $(shell find tp_kernels -name '*.py' 2>/dev/null)
	TP_KERNELS_BUILD_CUDA=0 $(CPU_PY) -m pip install -q . --no-build-isolation --no-deps
	touch $@

# ---- the GPU machine: its stack checked here, and the one command to run there ----------------------------
# The GPU machine has Python 3.12, torch 2.11.0+cu130 and triton 3.6.0 and no network. .venv-gpu-image holds
# that stack (requirements-gpu-image.txt) so that a break shows here: the package builds against it (CPU and
# CUDA sources, sm_90a only, the arch of that machine) and passes the import, op and Triton interpreter tests.
GPU_IMAGE_VENV := .venv-gpu-image
GPU_IMAGE_PY := $(GPU_IMAGE_VENV)/bin/python
# pyenv's 3.12 is not on PATH here (pyenv's global version is 3.11); elsewhere python3.12 from PATH
GPU_IMAGE_PYTHON ?= $(or $(lastword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),python3.12)
GPU_IMAGE_TESTS := tests/test_import.py tests/test_ops.py tests/kernels

test-gpu-image: $(GPU_IMAGE_VENV)/.built
	TP_KERNELS_EXPECT_CUDA_BUILD=1 $(GPU_IMAGE_PY) -m pytest $(GPU_IMAGE_TESTS) $(PYTEST_ARGS)

$(GPU_IMAGE_VENV)/.deps: requirements-gpu-image.txt
	test -x $(GPU_IMAGE_PY) || $(GPU_IMAGE_PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_PY) -m pip install -q -r requirements-gpu-image.txt
	touch $@

# Editable, like .venv: Python 3.12's extension is tp_kernels/_C.cpython-312-*.so, beside .venv's 3.11 one
# (objects in build/temp-cuda-torch2.11.0*), so the tests run from the tree as they do on the GPU machine.
$(GPU_IMAGE_VENV)/.built: $(GPU_IMAGE_VENV)/.deps $(EXT_SOURCES)
	TP_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a $(GPU_IMAGE_PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

# On a GPU node: the Python already there (python3 unless PYTHON is given on the command line), no venv.
# Without a GPU it says so in one line and fails.
GPU_CHECK_PYTHON := $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),python3)

gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) $(CPU_VENV) $(GPU_IMAGE_VENV) tp_kernels/_C*.so
