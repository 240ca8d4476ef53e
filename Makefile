# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs the pinned dependencies and the package (building tp_kernels._C,
#               CUDA sources included when nvcc is found), then runs the demo
#   make test   the same set-up, then the whole test suite; then the extension's tests again against a
#               CPU-only torch in .venv-cpu, installed from the sdist (it must build and work there too)
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

# The extension against a CPU-only torch (2.13.0+cpu), installed from the sdist: the tests that exercise the
# compiled extension and the CPU path of every op, collective, layer and the decoder. The rest of the suite
# (Hugging Face parity, parallelize plans, benchmarks' harness, examples, Triton, gpu-check's driver) does not
# depend on how torch or the extension was built and ran in .venv. Run from inside .venv-cpu: outside the tree.
CPU_TORCH_TESTS := tests/test_import.py tests/test_install.py tests/test_ops.py tests/test_grad_mode.py \
	tests/test_distributed.py tests/test_shm_comm.py tests/test_shm_faults.py tests/test_faults.py \
	tests/test_layers.py tests/test_overlap.py tests/test_decode_collectives.py tests/comm \
	tests/models/test_generation.py tests/models/test_loading.py

test-cpu-torch: $(CPU_VENV)/.built
	cd $(CPU_VENV) && TP_KERNELS_EXPECT_CUDA_BUILD=0 bin/python -m pytest -c ../pyproject.toml --rootdir .. \
		$(addprefix ../,$(CPU_TORCH_TESTS)) $(PYTEST_ARGS)

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

# The CPU venv gets a regular (non-editable) install from the sdist, so that make test builds and installs the
# sdist as a user would (and its tp_kernels/_C*.so lives in the venv's site-packages, not in the tree, where the
# editable install of .venv keeps its own). The sdist is unpacked over the previous one except its build/, where
# ninja keeps the objects: unpacked sources keep their modification times, so only what changed recompiles.
SDIST_DIR := build/sdist
SDIST_TREE := $(SDIST_DIR)/tp_kernels-0.1.0

$(CPU_VENV)/.built: $(CPU_VENV)/.deps $(VENV)/.deps $(EXT_SOURCES) $(shell find tp_kernels -name '*.py' 2>/dev/null)
	rm -f $(SDIST_DIR)/tp_kernels-*.tar.gz
	mkdir -p $(SDIST_DIR) && $(PY) -m build --sdist --no-isolation --outdir $(SDIST_DIR) . > $(SDIST_DIR)/build.log 2>&1 \
		|| (cat $(SDIST_DIR)/build.log; false)
	mkdir -p $(SDIST_TREE) && find $(SDIST_TREE) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	tar -xzf $(SDIST_TREE).tar.gz -C $(SDIST_DIR)
	cd $(SDIST_TREE) && TP_KERNELS_BUILD_CUDA=0 $(abspath $(CPU_PY)) -m pip install -q . --no-build-isolation --no-deps
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
