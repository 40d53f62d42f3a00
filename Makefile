# lmcache-kube: one Makefile for the engine, the operator, the chart and the e2e harness.
# Fragments owned by each part live beside it and are included below.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | sort | awk 'BEGIN{FS=":.*?## "}{printf "  %-18s %s\n", $$1, $$2}'

# Installs go through uv: its cache sits beside the venvs (same filesystem), so both venvs
# hardlink one copy of each file instead of holding their own; GPU-only kernel packages are left
# out on CPU machines (requirements/gpu-kernels.txt).
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
VENV_EXCLUDES ?= requirements/gpu-kernels.txt
UV_INSTALL = UV_CACHE_DIR=$(CURDIR)/.cache/uv UV_SYSTEM_CERTS=1 $(UV) pip install -q \
	$(if $(VENV_EXCLUDES),--excludes $(VENV_EXCLUDES))

$(STAMP): pyproject.toml operator/pyproject.toml $(VENV_EXCLUDES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV_INSTALL) --python $(PY) -e '.[dev,vllm]' -e './operator[dev]'
	touch $@

venv: $(STAMP) ## create .venv with the engine, the operator, vLLM and the dev tools

VENV_LATEST := .venv-vllm-latest
STAMP_LATEST := $(VENV_LATEST)/.installed

$(STAMP_LATEST): pyproject.toml $(VENV_EXCLUDES) $(STAMP)
	$(PYTHON) -m venv $(VENV_LATEST)
	$(UV_INSTALL) --python $(VENV_LATEST)/bin/python -e '.[dev,vllm-latest]'
	touch $@

venv-vllm-latest: $(STAMP_LATEST) ## a second venv with the newest vLLM (the vllm-latest extra)

unit-vllm-latest: $(STAMP_LATEST) ## the vLLM connector tests against the newest vLLM (CPU)
	$(VENV_LATEST)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

lint: $(STAMP) ## ruff + mypy
	$(VENV)/bin/ruff check lmcache operator tests e2e benchmarks
	$(VENV)/bin/ruff format --check lmcache operator tests e2e benchmarks
	$(VENV)/bin/mypy lmcache operator/lmcache_operator benchmarks e2e

unit: $(STAMP) ## fast unit tests (no cluster)
	$(PY) -m pytest -q tests

test: lint unit unit-vllm-latest e2e ## everything CI runs: lint, unit tests (two vLLMs), end-to-end tests

demo: $(STAMP) ## engine demo: a long context stored once, then queried cold vs warm
	$(PY) examples/engine_demo.py

bench: $(STAMP) ## engine store/retrieve/lookup throughput vs raw torch copies (writes .bench/engine.json)
	$(PY) benchmarks/bench_engine.py --out .bench/engine.json

bench-vllm-transfer: $(STAMP) ## GPU: vLLM paged cache <-> pinned pool vs raw PCIe copies (writes .bench/vllm_transfer.json)
	$(PY) benchmarks/bench_vllm_transfer.py --out .bench/vllm_transfer.json

.PHONY: help venv venv-vllm-latest lint unit unit-vllm-latest test demo bench bench-vllm-transfer

-include e2e/e2e.mk
-include operator/operator.mk
-include charts/charts.mk
-include images/images.mk
-include benchmarks/*.mk
