# The two set-up commands of the README. Each creates .venv and installs the project into it
# when missing or when pyproject.toml changed, then runs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/platform:$(CURDIR)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)   ## generate, ingest, train (Ray Train + DeepSpeed, CPU), evaluate, report
	$(PY) -m jobs.demo --config jobs/configs/debug.toml

test: $(STAMP)   ## lint, then every test
	$(PY) -m ruff check platform jobs tests serve benchmarks
	$(PY) -m ruff format --check platform jobs tests serve benchmarks
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir .site
	$(PY) -m pytest --durations=15

bench: $(STAMP)  ## the benchmark suites
	$(PY) -m jobs.benchmark patches --json runs/bench-patches.json

clean:
	rm -rf runs
