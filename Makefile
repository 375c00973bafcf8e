# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo example test lint bench clean pgbouncer screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(VENV)/.installed $(VENV)/.installed-test $@

$(VENV)/.installed-screenshots: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[screenshots]'
	touch $(VENV)/.installed $@

$(VENV)/.installed-examples: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[examples]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/tenantry demo

# The evcharge API (examples/evcharge) on the demo fleet, built in .evcharge-demo/ if
# missing; EXAMPLE_ARGS="--port 9000", or TENANTRY_CATALOG_URL=... for another fleet.
example: $(VENV)/.installed-examples
	$(BIN)/python -m examples.evcharge $(EXAMPLE_ARGS)

# PgBouncer for the pooler tests: Debian's package when it is missing and apt-get may run;
# otherwise one line says why, and those tests say what to install.
pgbouncer:
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null 2>&1; }; } && \
	    echo "make: installed pgbouncer (Debian package)"; } || \
	  echo "make: pgbouncer is missing and cannot be installed here (needs root and apt-get): the pooler tests will fail"

# pytest-xdist: PYTEST_WORKERS processes (default: one per CPU; 0 runs serially), each
# with its own throwaway PostgreSQL servers and PgBouncer; a test module stays on one
# worker (its module-scoped fixtures are built once). Servers named in
# TENANTRY_TEST_PG_URLS would be shared by the workers: serial then, unless asked.
# PYTEST_ARGS="tests/router -x", say.
PYTEST_WORKERS ?= $(if $(TENANTRY_TEST_PG_URLS),0,auto)
test: $(VENV)/.installed-test pgbouncer
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tenantry tests benchmarks examples
	$(BIN)/mypy --strict tenantry

# BENCH_ARGS=--quick for a run of a few minutes; results in benchmarks/results/.
bench: $(VENV)/.installed-bench pgbouncer
	$(BIN)/tenantry bench $(BENCH_ARGS)

# The README's PNGs of `tenantry status` and `tenantry top` in docs/, drawn on a small fleet
# of throwaway servers (SCREENSHOT_ARGS="--pg-url URL URL" for running ones).
screenshots: $(VENV)/.installed-screenshots
	$(BIN)/python benchmarks/screenshots.py $(SCREENSHOT_ARGS)

clean:
	rm -rf $(VENV) .tenantry .tenantry-demo .evcharge-demo .pytest_cache .mypy_cache .ruff_cache
