# Two front doors: `make demo` runs the main job on built-in synthetic data, `make test` runs the tests.
# Each creates .venv and installs the package on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: demo test test-all
demo: $(STAMP)
	$(VENV)/bin/alldetect demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m ''
