# One obvious way to run things: `make serve`, `make test`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_DIR := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.stamp-collab-installed

.PHONY: serve test bench bench-compare install node-deps services clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

install: $(STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-deps: $(NODE_STAMP)

# Services the tests need that the machine may lack or have stopped (tests start their own
# redis-server processes; PostgreSQL is the machine's own, started if down).
services:
	@bash scripts/services.sh

serve: $(STAMP)
	$(VENV)/bin/collab serve

test: $(STAMP) $(NODE_STAMP) services
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP) $(NODE_STAMP)
	$(PY) -m benchmarks.run

bench-compare: $(STAMP) $(NODE_STAMP)
	$(PY) -m benchmarks.compare

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules collab-data
