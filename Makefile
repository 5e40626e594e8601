# The two set-up commands: `make run` and `make test`. See README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# LiteLLM, the optional peer of `make bench-peers`, lives in its own venv, never in $(VENV)
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: run demo test soak bench bench-peers init clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve

demo: $(STAMP)
	$(BIN)/gateway serve --demo

init: $(STAMP)
	$(BIN)/gateway init

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

# The fuzz suite at length: 20,000 random requests over every route (about 10 minutes); SOAK_EXAMPLES=N to change
SOAK_EXAMPLES ?= 20000
soak: $(TEST_STAMP)
	GATEWAY_FUZZ_EXAMPLES=$(SOAK_EXAMPLES) $(BIN)/python -m pytest -s -o timeout=0 tests/e2e/test_fuzz_e2e.py

bench: $(TEST_STAMP)
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
