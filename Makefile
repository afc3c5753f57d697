VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test test-fast lint migrate clean bench bench-baseline bench-observability bench-replicas bench-galera bench-flame reliability

# Reinstall when the dependency list changes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[postgres,mysql,test,dev]'
	touch $(STAMP)

migrate: $(STAMP)
	$(BIN)/flask db upgrade

run: migrate
	$(BIN)/flask run --debug --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop: the unit tests on SQLite alone, spread over the cores by pytest-xdist.
# No fault suite, browser or gunicorn tests; TEST_*_URL and CI are dropped even when the
# shell sets them, so the other backends skip. --dist loadfile keeps a module's tests on
# one worker, so a topology a module starts (tests/db/test_replicas.py) is built once.
FAST_MARKS := not faults and not e2e and not gunicorn
test-fast: $(STAMP)
	env -u TEST_POSTGRES_URL -u TEST_MYSQL_URL -u CI \
		$(BIN)/python -m pytest -n auto --dist loadfile -m "$(FAST_MARKS)" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/mypy

# The benchmark (bench/run.py): writes docs/performance.md and docs/performance.png.
# wrk comes from Debian when apt is usable; without it a Python load generator is used.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[postgres,mysql,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || true
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.baseline
	$(BIN)/python -m bench.observability
	if [ "$(BENCH_REPLICAS)" = 1 ]; then $(BIN)/python -m bench.replicas; fi

# The post page against the commit before the database layer's redesign (bench/baseline.py),
# alone: `make bench` runs it too. BENCH_BASELINE=<git rev> picks another baseline.
bench-baseline: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || true
	$(BIN)/python -m bench.baseline

# What issue 18's request line and metrics cost on the post page (bench/observability.py):
# on (its defaults) against off, and against off without any access log, served side by
# side; alone: `make bench` runs it too. OBSERVABILITY_ARGS passes its options, e.g.
# OBSERVABILITY_ARGS='--repeats 20 --seconds 3'.
bench-observability: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || true
	$(BIN)/python -m bench.observability $(OBSERVABILITY_ARGS)

# Flame graphs of one served route (bench/flame.py): py-spy (needs root or ptrace rights) on
# every gunicorn worker under load; writes docs/flame/<label>.svg and .md. FLAME_ARGS passes
# its options, e.g. FLAME_ARGS='--app psycopg --label post-psycopg-raw' or '--rev 0fa6e80'.
bench-flame: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || true
	$(BIN)/python -m bench.flame $(FLAME_ARGS)

# Read replicas (bench/replicas.py): starts its own primary and two standbys (needs the
# PostgreSQL server binaries), adds its section to docs/performance.md. Also run by
# `make bench BENCH_REPLICAS=1`.
bench-replicas: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || true
	$(BIN)/python -m bench.replicas

# MariaDB Galera (bench/galera.py): starts its own three-node cluster (needs mariadbd,
# Debian's galera-4 and rsync), measures writes pinned to one node against spread over
# the nodes, and causal reads, in process; adds its section to docs/performance.md.
bench-galera: $(BENCH_STAMP)
	$(BIN)/python -m bench.galera

# The fault suite (pytest -m faults, scripts/reliability_report.py): writes
# docs/reliability.md and docs/reliability.png. Needs the PostgreSQL and MariaDB test
# servers (TEST_POSTGRES_URL, TEST_MYSQL_URL; defaults as in .ci/run); chart via matplotlib.
reliability: $(BENCH_STAMP)
	$(BIN)/python scripts/reliability_report.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
