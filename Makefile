# vidstream: `make demo` and `make test` do all the set-up on a fresh machine.
#
#   make test                          # creates .venv (torch 2.13.0 CPU, triton), builds, tests
#   make demo                          # same set-up, then the main job
#   make test PYTHON=python3 VENV=     # use an existing Python with torch as it is (GPU machine)
#
# The venv is reused when present; the extension is rebuilt when a C++/CUDA source changes.

PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist, where installed): one per core; the Triton interpreter is
# Python-bound, so two cores take about half the time.
PYTEST_WORKERS ?= auto

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
ENV_STAMP :=
else
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.installed
endif

# Every source and header under csrc/, at any depth: a header edit rebuilds the extension.
EXT_SOURCES := setup.py $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))
BUILD_STAMP := build/.ext-$(if $(strip $(VENV)),venv,system)

.PHONY: all build test demo bench lint compile-check clean

all: test

# Re-run when this file changes: a package added to the list reaches existing venvs too.
$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip" "setuptools>=77" wheel
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q triton numpy safetensors ninja pytest expecttest hypothesis ruff build tqdm matplotlib diffusers pyyaml pytest-xdist
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(EXT_SOURCES)
	@mkdir -p build
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest -q $$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(PYTEST_WORKERS)") \
		$(PYTEST_ARGS) tests

demo: build
	$(PY) -m vidstream demo --compare --out out/demo

# Every benchmark on the CPU, into the bench/results/ files the README quotes (~10 minutes).
bench: build
	bash bench/cpu_figures.sh $(PY)

lint: $(ENV_STAMP)
	$(PY) -m ruff check .

# The torch-free CUDA kernels for sm_80 and sm_90a, and a syntax check of the CUDA bindings
# (needs nvcc); every Triton kernel compiled for sm_90 with triton TRITON_AOT_VERSION, the
# GPU machines' version, from a small venv build/triton-<version> (tools/triton_aot_check.py;
# TRITON_AOT_VERSION= skips it, TRITON_AOT_ARGS="--configs all --timeout 0" is the full check).
# By default the float32 backward kernels are left out: their IEEE dots take minutes each to
# compile on 2 cores (they compile: TRITON_AOT_ARGS=--only attention_backward checks them).
# No GPU.
TRITON_AOT_VERSION ?= 3.6.0
TRITON_AOT_ARGS ?= --skip attention_backward:fp32
compile-check: $(ENV_STAMP)
	TRITON_AOT_VERSION="$(TRITON_AOT_VERSION)" TRITON_AOT_ARGS="$(TRITON_AOT_ARGS)" \
		tools/compile_check.sh $(PY)

clean:
	rm -rf build vidstream/_C*.so *.egg-info
