# Every target creates/uses .venv itself: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench pretrained clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

# two test processes (pytest-xdist): alone the suite keeps about one core busy (subprocess start-up,
# single-threaded Python), so two processes on two cores take ~2/3 of the time
TEST_JOBS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) -m "not slow"

demo: $(STAMP)
	$(PY) -m pipelines.main

# the shipped model: train on the DSB training split, export, evaluate on the validation split
pretrained: $(STAMP)
	$(PY) -m pipelines.main --data ../shared/data/dsb2018-train --config models/cellseg-nuclei.yaml \
		--output models/cellseg-nuclei.onnx
	$(PY) -m cellseg quantize models/cellseg-nuclei.onnx ../shared/data/dsb2018-train

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) mlruns mlflow.db checkpoints outputs
