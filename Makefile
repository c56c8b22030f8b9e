# netota: `make test` and `make demo` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.netota-installed
# What the installed package is built from: a change to any of them reinstalls it, so the venv's
# `netota` and `twistd netota` (which import the installed copy, not this tree) are never stale.
SOURCES = setup.cfg pyproject.toml $(shell find netota_daemon twisted -type f -not -path '*/__pycache__/*' -not -name '*.pyc')
PYTEST_ARGS ?=

.PHONY: test test-api lint demo rack-demo install benchmark clean

# The type check (strict, with the zope plugin) covers the whole package (every layer, the simulator,
# the client) and tools/; the linter and formatter the tree.
TYPED = netota_daemon tools

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q --upgrade pip; }
	$(BIN)/python -m pip install -q '.[test]'
	# Regenerate Twisted's plugin cache so `twistd --help` lists netota.
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(TYPED)

# Tests run against the source tree (python -m pytest puts it first on sys.path).
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The OpenAPI document against a running daemon, longer than make test's bounded run (20 examples
# per operation and mode): schemathesis with SCHEMATHESIS_EXAMPLES each (tests/test_openapi_live.py).
SCHEMATHESIS_EXAMPLES ?= 500
test-api: $(STAMP)
	NETOTA_SCHEMATHESIS_EXAMPLES=$(SCHEMATHESIS_EXAMPLES) $(BIN)/python -m pytest tests/test_openapi_live.py $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m netota_daemon.demo

# Needs root (network namespaces): N simulated devices at 192.168.1.1 flashed at once.
rack-demo: $(STAMP)
	$(BIN)/python -m netota_daemon.rack_demo $(RACK_DEMO_ARGS)

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks.serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
