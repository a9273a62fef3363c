# make help  - this list (also what a bare `make` prints)
# make run   - install what serving needs into .venv and serve with models.yaml
#              (make run CONFIG=other.yaml PORT=9000 HOST=0.0.0.0)
# make install, make install-test - only the installs of `make run` and `make test`
# make lint  - ruff and the type check (mypy), the same checks as pre-commit (.pre-commit-config.yaml)
# make test  - install the test tools too, lint, build the docs (strict) and run the test suite
# make docs  - build the documentation site into site/ (mkdocs build --strict: a broken link fails)
# make bench - print benchmark numbers (not tests)
# make bench-burst - thousands of requests in flight at once, then py-spy on the proxy (~12 minutes)
# make clean - remove .venv, var/ (stored images, the usage ledger), site/ and the tools' caches
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= models.yaml
PORT ?=
HOST ?=
# One stamp per install, so `make test` after `make run` still adds the test tools.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

SERVE_ARGS := --config $(CONFIG) $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

.PHONY: help install install-test run test lint docs bench bench-burst clean
# A bare `make` prints the targets rather than starting a multi-minute install.
.DEFAULT_GOAL := help

help:
	@sed -n 's/^# \(make .*\)/\1/p; s/^#   \( *(.*\)/    \1/p' $(firstword $(MAKEFILE_LIST))

install: $(RUN_STAMP)
install-test: $(TEST_STAMP)

$(PY):
	@echo "creating the virtual environment in $(VENV)..."
	$(PYTHON) -m venv $(VENV)
	@echo "updating pip..."
	$(PIP) install --upgrade --progress-bar off pip

# Reinstall when the dependencies change. torch is pinned in pyproject (a CPU wheel on these machines);
# the shipped models.yaml serves the tiny local model, so serving needs the local engine.
$(RUN_STAMP): pyproject.toml | $(PY)
	@echo "installing the proxy and the local engine (torch 2.13.0, diffusers, transformers; this takes a while)..."
	$(PIP) install --progress-bar off -e '.[local]'
	@touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	@echo "installing the proxy, the local engine and the test tools (pytest, ruff, hypothesis, openai, mkdocs)..."
	$(PIP) install --progress-bar off -e '.[local,test]'
	@touch $@ $(RUN_STAMP)

run: install
	$(VENV)/bin/qwen-image-proxy serve $(SERVE_ARGS)

# The same commands as the hooks in .pre-commit-config.yaml. mypy keeps its cache in .mypy_cache: the
# first run reads torch, diffusers and transformers (a minute or more), later ones take seconds.
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

docs: install-test
	@# not --quiet: it hides the warnings --strict counts, and a broken link would pass
	$(VENV)/bin/mkdocs build --strict

test: lint docs
	$(PY) -m pytest -q

bench: install-test
	$(PY) bench/bench_proxy.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_usage.py
	$(PY) bench/bench_usage_api.py
	$(PY) bench/bench_gateway.py

# The burst table of docs/benchmarks.md; py-spy (the bench extra) for its profile.
bench-burst: install-test
	$(PIP) install --progress-bar off -e '.[bench]'
	$(PY) bench/bench_gateway.py --burst --burst-profile

clean:
	rm -rf $(VENV) var site .pytest_cache .ruff_cache .mypy_cache
