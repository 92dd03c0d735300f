# Two commands: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test test-system test-live lint format install clean bench bench-all readme

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"' || \
	  { echo "Python 3.11 or newer is needed (set PYTHON=python3.x)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes. `make run` needs only what running needs; the
# other targets also install the test extra (pytest, Playwright, linters).
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "== Installing the broker and what it needs to run into $(VENV)"
	$(BIN)/python -m pip install --progress-bar off -e .
	@touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "== Installing the broker with its test and lint tools into $(VENV)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	@echo "== Migrating the database"
	$(BIN)/flask --app broker db upgrade
	$(BIN)/python -m broker.devserver

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole topology as real processes (PostgreSQL, Redis, emulator, 2 web, 3 workers) under
# faults; needs BROKER_TEST_POSTGRES_URL and redis-server. Apart from `make test`; CI runs both.
test-system: $(STAMP)
	$(BIN)/python -m pytest tests/system $(PYTEST_ARGS)

# The emulator's contract tests against a real Cloudflare account (CLOUDFLARE_ACCOUNT_ID and
# CLOUDFLARE_API_TOKEN in the environment; skipped, saying so, without them). `make test` runs
# the same tests against the emulator.
test-live: $(STAMP)
	BROKER_TEST_LIVE=1 $(BIN)/python -m pytest tests/emulator/test_contract.py -rs $(PYTEST_ARGS)

# Style, the architecture (import-linter contracts) and the types (mypy); see pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The cost of a create beside the emulator and the closest peer, SQLite and (with
# BENCH_DATABASE_URL) PostgreSQL, in one run of a few minutes; bench-all runs every script.
bench: $(STAMP)
	$(BIN)/python tests/bench/bench_peer.py $(BENCH_ARGS)

bench-all: $(STAMP)
	@status=0; for f in tests/bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || status=1; done; exit $$status

readme: $(STAMP)
	$(BIN)/python -c 'from broker.platform.config import update_readme; update_readme()'

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .import_linter_cache .grimp_cache
