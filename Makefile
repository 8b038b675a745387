# make test   -- create .venv with the pinned torch, build embedfast in place, run the test suite
# make bench  -- the same set-up, then the benchmark report (python -m embedfast bench)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench demo setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/include/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m embedfast bench

clean:
	rm -rf build $(VENV) *.egg-info embedfast/*.so
