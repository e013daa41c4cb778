# Quick start:  make bench  (set up + benchmark suite)   |   make test  (set up + tests)
# Versions come from requirements/constraints.txt; `make test-latest` / `make bench-latest` run the
# same against the newest releases, in their own virtualenv (.venv-latest).
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP := VENV=$(VENV) bash scripts/setup.sh

.PHONY: setup test bench info clean test-latest bench-latest constraints
setup:
	$(SETUP)

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench:
	EXTRAS=bench,peers $(SETUP)
	$(PY) -m bench $(BENCH_ARGS)

test-latest:
	$(MAKE) test VENV=.venv-latest PTCORE_CONSTRAINTS=latest

bench-latest:
	$(MAKE) bench VENV=.venv-latest PTCORE_CONSTRAINTS=latest

# After the suites pass in a venv (e.g. .venv-latest): record its versions as the verified ones.
constraints:
	bash scripts/freeze_constraints.sh $(VENV) > requirements/constraints.txt

info: setup
	$(PY) -m ptcore info

clean:
	rm -rf build *.egg-info ptcore/*.so
