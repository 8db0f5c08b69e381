# The two commands of the README:
#   make quickstart   set up .venv and run the whole recipe on a tiny model (CPU)
#   make test         set up .venv and run the whole test suite (CI)
#   make test-fast    the suite without the multi-process / end-to-end tests (day-to-day)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quickstart

.PHONY: venv quickstart test test-fast clean

venv: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py pyproject.toml $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-cpu.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

quickstart: venv
	$(VENV)/bin/longsky quickstart --output $(RUN_DIR)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info megatron_longsky/_ext_*.so
