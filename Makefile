# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs the pinned dependencies and the package (building tp_kernels._C,
#               CUDA sources included when nvcc is found), then runs the demo
#   make test   the same set-up, then the whole test suite; then the CPU tests again against a CPU-only
#               torch build in .venv-cpu (the extension must build and work there too)
# Both are idempotent: stamps skip what is done; the extension rebuild is incremental (ninja, build/).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CPU_VENV := .venv-cpu
CPU_PY := $(CPU_VENV)/bin/python
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: demo test test-main test-cpu-torch bench clean

demo: $(VENV)/.built
	$(PY) -m tp_kernels.demo

test: test-main test-cpu-torch

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

clean:
	rm -rf build $(VENV) $(CPU_VENV) tp_kernels/_C*.so
