# Two commands set up everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test bench loadtest docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/eddy serve

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m loadtests.bench $(BENCH_ARGS)

loadtest: $(STAMP)
	$(PY) -m loadtests.loadtest $(LOADTEST_ARGS)

docs: $(STAMP)
	$(PY) -m service.config > docs/CONFIGURATION.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
