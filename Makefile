# make run   - install into .venv and serve on 127.0.0.1:8000 with models.yaml
# make test  - lint and run the test suite
# make bench - print benchmark numbers (not tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG ?= models.yaml

.PHONY: install run test lint bench clean

install: $(STAMP)

# Reinstall when the dependencies change. torch is pinned in pyproject (a CPU wheel on these machines).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,test]'
	touch $(STAMP)

run: install
	$(VENV)/bin/qwen-image-proxy serve --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_proxy.py
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
