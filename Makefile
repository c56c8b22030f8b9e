# netota: `make test` and `make demo` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.netota-installed
# The venv's own copy of the package (its `netota` and `twistd netota` import it, not this tree):
# reinstalled when a source file or directory changes (a directory's time changes when a file in
# it is added, removed or renamed). make lint and make test run against the tree and need only the
# dependencies, so an edit does not reinstall before them.
PACKAGE = $(VENV)/.netota-package
SOURCES = $(shell find netota_daemon twisted -name __pycache__ -prune -o \( -type d -o -name '*.py' -o -name '*.json' -o -name '*.html' -o -name '*.js' -o -name '*.css' \) -print)
PYTEST_ARGS ?=

.PHONY: test test-api lint demo rack-demo install benchmark clean

# The type check (strict, with the zope plugin) covers the whole package (every layer, the simulator,
# the client) and tools/; the linter and formatter the tree.
TYPED = netota_daemon tools

install: $(PACKAGE)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '.[test]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

$(PACKAGE): $(STAMP) $(SOURCES)
	$(BIN)/python -m pip install -q --no-deps .
	# Regenerate Twisted's plugin cache so `twistd --help` lists netota.
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(PACKAGE)

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
test-api: $(PACKAGE)
	NETOTA_SCHEMATHESIS_EXAMPLES=$(SCHEMATHESIS_EXAMPLES) $(BIN)/python -m pytest tests/test_openapi_live.py $(PYTEST_ARGS)

demo: $(PACKAGE)
	$(BIN)/python -m netota_daemon.demo

# Needs root (network namespaces): N simulated devices at 192.168.1.1 flashed at once.
rack-demo: $(PACKAGE)
	$(BIN)/python -m netota_daemon.rack_demo $(RACK_DEMO_ARGS)

benchmark: $(PACKAGE)
	$(BIN)/python -m benchmarks.serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
