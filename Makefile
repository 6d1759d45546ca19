# Two entry points: `make run` (set up, then the main job) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU wheel first, so nothing below can pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,data]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mustat prune --seeds 0,1,2 --out runs/main

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check mustat validation tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/tracker_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
