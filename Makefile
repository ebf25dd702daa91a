# `make run` and `make test` work on a fresh machine: they build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-postgres demo bench bench-queries bench-forwarding bench-postgres lint check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A local signing secret and dashboard token, generated once and kept in .env (git-ignored).
.env:
	@$(PYTHON) -c "import secrets; print('RUNFLOW_WEBHOOK_SECRET=whsec_' + secrets.token_urlsafe(24)); print('RECEIVER_DASHBOARD_TOKEN=' + secrets.token_urlsafe(24))" > .env
	@echo "wrote .env with a generated RUNFLOW_WEBHOOK_SECRET and RECEIVER_DASHBOARD_TOKEN"

run: $(STAMP) .env
	$(BIN)/receiver serve

# The whole flow without a Runflow account: emulator + receiver + a consumer, a batch submitted.
DEMO_PORT ?= 8000
demo: $(STAMP)
	$(BIN)/python -m receiver.fakes.demo --port $(DEMO_PORT)

# Ingest throughput: bare app vs naive durable receiver vs receiver (wrk, apt-get install wrk;
# without it bench/load.py sends the same load).
bench: $(STAMP)
	$(BIN)/python bench/ingest.py

# The same load against receiver on PostgreSQL with 1, 2 and 4 workers (needs postgresql).
bench-postgres: $(STAMP)
	$(BIN)/python bench/ingest.py --postgres

# Outbox drain into Redis and callback → Redis latency (needs redis-server).
bench-forwarding: $(STAMP)
	$(BIN)/python bench/forwarding.py

# Read paths at 1,000,000 evaluations (docs/performance.md); the database is generated once.
BENCH_DB ?= bench/data/evaluations-1m.db
bench-queries: $(STAMP)
	test -f $(BENCH_DB) || $(BIN)/python bench/generate.py --count 1000000 --db $(BENCH_DB)
	$(BIN)/python bench/queries.py --db $(BENCH_DB)

test: $(STAMP)
	$(BIN)/pytest -q

# The store, API and pipeline suites again on PostgreSQL (tests/postgres.py starts a server from
# the Debian package `postgresql`); tests about the SQLite file itself are skipped there.
PG_TESTS := tests/test_store.py tests/test_web.py tests/test_api.py \
	tests/test_pipeline.py tests/test_worker.py tests/test_e2e.py tests/test_cli.py \
	tests/test_cli_outbox.py tests/test_rollups.py tests/test_search.py tests/test_maintenance.py \
	tests/test_metrics.py tests/test_faults.py tests/test_feedback.py tests/test_dashboard.py \
	tests/test_server.py tests/test_slow_clients.py tests/test_fuzz.py tests/test_backlog.py \
	tests/test_protocol.py
test-postgres: $(STAMP)
	RECEIVER_TEST_BACKEND=postgresql $(BIN)/pytest -q $(PG_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check receiver tests bench
	$(BIN)/ruff format --check receiver tests bench
	$(BIN)/mypy receiver bench

check: lint test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
