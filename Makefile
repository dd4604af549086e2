# Two commands on a fresh machine: `make run` and `make test` (`make test-fast`: the unit tests, no servers).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
FHIR_SERVER_DIR = tests/fhir_server

.PHONY: run test test-fast install install-test spark fhir-server browser java bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[test,spark]'
	touch $@

install: $(VENV)/.installed

# the optional Spark engine (cds-service screen --engine spark): PySpark, PyArrow, pandas; Java 17+ beside it;
# then the class archive local Spark sessions start from (a minute, once: each later session starts ~7 s sooner)
spark: install java
	$(PIP) install --quiet -e '.[spark]'
	$(VENV)/bin/cds-service spark-classes

install-test: $(VENV)/.installed-test fhir-server browser java
	tests/ensure_postgres.sh

# a Java runtime for the Spark engine's tests (tests/test_screen.py runs Spark local[2])
java:
	@command -v java >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "make: the Spark tests need Java 17+; install it as root: apt-get install --no-install-recommends openjdk-17-jre-headless" >&2; exit 1; }; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null; }

# Debian's Chromium for the real-browser suite (tests/e2e): Playwright drives it, no browser is downloaded
browser:
	@command -v chromium >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "make: the browser tests need Debian's chromium; install it as root: apt-get install --no-install-recommends chromium" >&2; exit 1; }; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# Medplum's in-memory FHIR server for the fallback tests (exact versions from the lockfile)
fhir-server: $(FHIR_SERVER_DIR)/node_modules/.installed

$(FHIR_SERVER_DIR)/node_modules/.installed: $(FHIR_SERVER_DIR)/package-lock.json
	cd $(FHIR_SERVER_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# local testing: client JWT authentication off and CORS for any origin (the banner says so); production sets neither
run: install
	CDS_AUTH=$${CDS_AUTH:-off} CDS_CORS_ORIGINS=$${CDS_CORS_ORIGINS:-*} $(VENV)/bin/cds-service serve

test: install-test
	$(PY) -m pytest

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not integration" -q

bench: install
	@command -v wrk >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "make: the benchmark needs wrk; install it as root: apt-get install --no-install-recommends wrk" >&2; exit 1; }; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(FHIR_SERVER_DIR)/node_modules .pytest_cache
