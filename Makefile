# Two commands on a fresh clone:
#   make demo   # set up .venv/, export SmolLM2-135M at 80% ActTail, perplexity table, ORT generation at 50% and 80%
#   make test   # set up .venv/ and run the test suite
PY := .venv/bin/python
# WikiText-2 raw (wiki.valid.raw, wiki.test.raw) for the demo and the tests; without it the library reads the Hub
# dataset when online. Override: make test WIKITEXT=/path/to/wikitext-2
WIKITEXT ?= ../shared/data/wikitext-2
export ACTTAIL_WIKITEXT_DIR := $(abspath $(WIKITEXT))
SHELL := /bin/bash

.PHONY: setup demo test ops wheel-smoke clean
setup: .venv/.setup-done ops

.venv/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

ops: .venv/.setup-done
	bash scripts/build_ops.sh

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

# `pip wheel .` (scikit-build-core + CMakeLists.txt), then a fused export from a fresh venv holding only that wheel
wheel-smoke: setup
	bash scripts/wheel_smoke.sh

clean:
	rm -rf build acttail_export/lib/*.so
