# The two set-up commands: `make run` and `make test`. See README.md.
# `make run PORT=9000`, `make demo PORT=9000 DEMO_PORT=9001` choose the ports.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
# LiteLLM, the optional peer of `make bench-peers`, lives in its own venv, never in $(VENV)
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: run demo test soak lint bench bench-peers init clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

PORT ?=
DEMO_PORT ?=

run: $(STAMP)
	$(BIN)/gateway serve $(if $(PORT),--port $(PORT))

demo: $(STAMP)
	$(BIN)/gateway serve --demo $(if $(PORT),--port $(PORT)) $(if $(DEMO_PORT),--demo-port $(DEMO_PORT))

init: $(STAMP)
	$(BIN)/gateway init

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

# The long runs: schemathesis with many generated requests per operation of /openapi.json, the fuzz
# suite at 20,000 random requests over every route (SOAK_EXAMPLES=N to change), then a 16,000-request
# burst's settlement measured (bench/settle.py: look-ups/s once traffic stops, idle CPU after); about
# 17 minutes in all
SOAK_EXAMPLES ?= 20000
soak: $(TEST_STAMP)
	GATEWAY_SOAK=1 $(BIN)/python -m pytest -q tests/e2e/test_openapi_e2e.py
	GATEWAY_FUZZ_EXAMPLES=$(SOAK_EXAMPLES) $(BIN)/python -m pytest -s -o timeout=0 tests/e2e/test_fuzz_e2e.py
	$(BIN)/python -m bench.settle

# ruff, mypy and the import-linter contracts in pyproject.toml (imports flow one way; the emulator stands alone)
lint: $(TEST_STAMP)
	$(BIN)/ruff check gateway openrouter_emulator tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# granian (the `bench` extra) is installed beside the test extra; without it the granian target is skipped, noted
$(BENCH_STAMP): pyproject.toml | $(TEST_STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]' && touch $@ || echo "bench: could not install granian; its target will be skipped" >&2

bench: $(TEST_STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	{ $(PEERS_VENV)/bin/pip install --quiet --upgrade pip && $(PEERS_VENV)/bin/pip install --quiet 'litellm[proxy]'; } || { \
	  echo "bench-peers: could not install litellm[proxy] into $(PEERS_VENV) (is PyPI reachable?)" >&2; exit 1; }
	touch $@

bench-peers: $(TEST_STAMP) $(PEERS_STAMP)
	$(BIN)/python -m bench.peers

clean:
	rm -rf $(VENV) $(PEERS_VENV) data .pytest_cache
