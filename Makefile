# One obvious way to run things: `make serve`, `make test`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_DIR := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.stamp-collab-installed
WEB_DIR := clients/web
WEB_STAMP := $(WEB_DIR)/node_modules/.stamp-collab-installed
WEB_BUILD := $(WEB_DIR)/dist/index.html

.PHONY: serve test bench bench-compare install node-deps web services clean

$(STAMP): pyproject.toml setup.py collab/_fastscan.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

install: $(STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-deps: $(NODE_STAMP)

# The browser app (served at / and /r/<room>): rebuilt when its sources change.
$(WEB_STAMP): $(WEB_DIR)/package.json $(WEB_DIR)/package-lock.json
	cd $(WEB_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(WEB_BUILD): $(WEB_STAMP) $(WEB_DIR)/build.mjs $(wildcard $(WEB_DIR)/src/*)
	cd $(WEB_DIR) && node build.mjs

web: $(WEB_BUILD)

# Services the tests need that the machine may lack or have stopped (tests start their own
# redis-server processes; PostgreSQL is the machine's own, started if down).
services:
	@bash scripts/services.sh

serve: $(STAMP) $(WEB_BUILD)
	$(VENV)/bin/collab serve

test: $(STAMP) $(NODE_STAMP) $(WEB_BUILD) services
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# BENCH_ARGS: e.g. --quick (a ~1-3 minute version) or --nice -10 (shield from other load, as root).
bench: $(STAMP) $(NODE_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

bench-compare: $(STAMP) $(NODE_STAMP)
	$(PY) -m benchmarks.compare $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules $(WEB_DIR)/node_modules $(WEB_DIR)/dist collab-data
