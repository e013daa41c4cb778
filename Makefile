# Quick start:  make bench  (set up + benchmark suite)   |   make test  (set up + tests)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench info clean
setup:
	VENV=$(VENV) bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench:
	VENV=$(VENV) EXTRAS=bench,peers bash scripts/setup.sh
	$(PY) -m bench $(BENCH_ARGS)

info: setup
	$(PY) -m ptcore info

clean:
	rm -rf build *.egg-info ptcore/*.so
