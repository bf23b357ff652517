# Two commands on a fresh clone:
#   make demo   # set up .venv/, export SmolLM2-135M at 80% sparsity (default allocation), perplexity table, ORT generation at 50% and 80%
#   make test   # set up .venv/ (and .venv-optimum/ for the optimum base) and run the test suite
PY := .venv/bin/python
OPTIMUM_PY := .venv-optimum/bin/python
# WikiText-2 raw (wiki.valid.raw, wiki.test.raw) for the demo and the tests; without it the library reads the Hub
# dataset when online. Override: make test WIKITEXT=/path/to/wikitext-2
WIKITEXT ?= ../shared/data/wikitext-2
export ACTTAIL_WIKITEXT_DIR := $(abspath $(WIKITEXT))
SHELL := /bin/bash

.PHONY: setup setup-optimum demo test test-default test-optimum ops wheel-smoke clean
setup: .venv/.setup-done ops

.venv/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# the optimum base (optimum-onnx pins transformers < 4.58): its own environment, the same clone and op library
setup-optimum: .venv-optimum/.setup-done ops

.venv-optimum/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh optimum
	touch $@

ops: .venv/.setup-done
	bash scripts/build_ops.sh

demo: setup
	$(PY) examples/demo.py

# every test runs: the `optimum` marked ones in .venv-optimum/, all others in .venv/ (GPU tests skip without a GPU)
test: test-default test-optimum

test-default: setup
	$(PY) -m pytest -q -m "not optimum"

test-optimum: setup-optimum
	$(OPTIMUM_PY) -m pytest -q -m optimum

# `pip wheel .` (scikit-build-core + CMakeLists.txt), then a fused export from a fresh venv holding only that wheel
wheel-smoke: setup
	bash scripts/wheel_smoke.sh

clean:
	rm -rf build acttail_export/lib/*.so
