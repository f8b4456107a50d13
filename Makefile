# aac-tokend: `make demo` shows it working, `make test` proves it. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The demo needs the package and its runtime dependencies only: no test, lint or fuzz tools.
DEMO_STAMP := $(VENV)/.demo-installed

.PHONY: demo demo-fleet test lint typecheck unit bench crash fleet-crash fuzz sysdeps clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

$(DEMO_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	@touch $(DEMO_STAMP)

sysdeps:
	@bash .ci/sysdeps

demo: $(DEMO_STAMP)
	$(PY) -m aac_tokend demo

# Fleet mode's demo: a local etcd (installed by sysdeps where it can be), three daemons as
# three hosts, the sandbox; the owner is SIGKILLed and another host takes over.
demo-fleet: $(DEMO_STAMP) sysdeps
	$(PY) -m aac_tokend demo --fleet --seconds 40

lint: $(STAMP)
	$(VENV)/bin/ruff check aac_tokend tests
	$(VENV)/bin/ruff format --check aac_tokend tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict aac_tokend

unit: $(STAMP) sysdeps
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) -m tests.bench

crash: $(STAMP)
	$(PY) -m tests.crash_campaign --kills 300

fleet-crash: $(STAMP)
	$(PY) -m tests.fleet_campaign --faults 200

fuzz: $(STAMP)
	$(PY) -m tests.fuzz --seconds 60

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
