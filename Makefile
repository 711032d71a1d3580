# Two commands do all the set-up on a fresh machine:
#   make demo   -- create the environment (first use) and run the main job on the built-in demo data
#   make test   -- create the environment (if needed), lint, and run the test suite
#   make test-slow -- also the slow tests (fault injection, disk full, 10,000-example properties)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmtag-installed

.PHONY: demo test test-slow lint env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mmtag demo --out demo_run

lint: $(STAMP)
	$(PY) -m ruff check src tests tools

test: $(STAMP)
	$(PY) -m ruff check src tests tools
	$(PY) -m pytest -q -m "not slow" -n auto --dist loadgroup  # one worker per core (pytest-xdist); a module marked xdist_group stays on one worker

# everything: the slow fault tests too, and 10,000 Hypothesis examples per CSV property
test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest -q

clean:
	rm -rf demo_run .pytest_cache .ruff_cache .hypothesis
