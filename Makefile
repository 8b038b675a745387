# make test    -- create .venv from requirements.lock, build embedfast in place, run the test suite (the
#                 extension's tests again on each lower CPU instruction-set path the machine can run)
# make bench   -- the same set-up, then the benchmark report (python -m embedfast bench)
# make compat  -- core and drop-in tests against the oldest supported transformers and torch (compat/run)
# make gpu-check OUT=DIR -- on a lent GPU machine, with its own python3: build, GPU tests, sanitizers, bench (gpu/check)
# make gpu-check-dry      -- the steps of gpu-check that need no GPU (CI runs it)
# make lock    -- re-resolve requirements-dev.txt into requirements.lock in a fresh venv (then run make test)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench compat gpu-check gpu-check-dry lock setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/include/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep '^pip==' requirements.lock)"
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip check
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# the extension's tests again under each lower CPU path this machine can run (EMBEDFAST_CPU_ISA), less the CMake
# build, which compiles the same sources whatever path runs
LOWER_CPU_ISAS = $(PY) -c 'import embedfast; info = embedfast.cpu_info(); print(*(info.runnable[:-1] if info else []))'

test: setup
	$(PY) -m pytest tests
	for isa in $$($(LOWER_CPU_ISAS)); do \
	  echo "== the extension's tests on the $$isa CPU path"; \
	  EMBEDFAST_CPU_ISA=$$isa $(PY) -m pytest -q -k "extension and not compile and not cmake" tests || exit 1; \
	done

bench: setup
	$(PY) -m embedfast bench

compat: setup
	bash compat/run

OUT ?= gpu-check-out
gpu-check:
	bash gpu/check $(OUT)

gpu-check-dry: setup
	PYTHON=$(PY) bash gpu/check --dry-run build/gpu-check-dry

lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet --upgrade pip
	build/lock-venv/bin/pip install --quiet -r requirements-dev.txt
	{ sed -n '1,2p' requirements.lock; build/lock-venv/bin/pip freeze --all; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf build/lock-venv

clean:
	rm -rf build $(VENV) *.egg-info embedfast/*.so
