# Two commands set up everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: serving needs Eddy and its runtime dependencies only; tests and benchmarks add their tools.
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test lint bench loadtest docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVE_STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $(SERVE_STAMP)

$(TEST_STAMP): $(SERVE_STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(TEST_STAMP)

serve: $(SERVE_STAMP)
	$(VENV)/bin/eddy serve

# Node's ws for the real-client matrix, and socket.io-client for the Socket.IO dialect, from their lockfiles
# (the tests skip them, saying why, where node is missing).
NODE_WS := tests/node/ws/node_modules/.package-lock.json
NODE_SOCKETIO := tests/node/socketio/node_modules/.package-lock.json

$(NODE_WS): tests/node/ws/package.json tests/node/ws/package-lock.json
	if command -v npm >/dev/null; then cd tests/node/ws && npm ci --no-audit --no-fund --silent; fi

$(NODE_SOCKETIO): tests/node/socketio/package.json tests/node/socketio/package-lock.json
	if command -v npm >/dev/null; then cd tests/node/socketio && npm ci --no-audit --no-fund --silent; fi

test: lint $(NODE_WS) $(NODE_SOCKETIO)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Type check and lint (settings in pyproject.toml); part of every `make test`.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check service handlers storage tests loadtests
	$(VENV)/bin/mypy

bench: $(TEST_STAMP)
	$(PY) -m loadtests.bench $(BENCH_ARGS)

loadtest: $(TEST_STAMP)
	$(PY) -m loadtests.loadtest $(LOADTEST_ARGS)

docs: $(SERVE_STAMP)
	$(PY) -m service.config > docs/CONFIGURATION.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
