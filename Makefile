# Two front doors: `make demo` runs the main job on built-in synthetic data, `make test` runs the tests.
# Each creates .venv and installs the package on first use.
PYTHON ?= python3
VENV := .venv
# what the tests need (.[dev]: every extra, the test tools and the browser), and what the demo runs (.[demo])
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# torch and torchvision are installed first, as a matched pair. Where a CPU-only torch 2.13.0 wheel is on
# offer (pip's find-links, or https://download.pytorch.org/whl/cpu as an extra index) pip takes it: about
# 2 GB in all (.[dev]) instead of about 7 GB with the CUDA build. For a GPU: make TORCH="torch==2.14.1 torchvision==0.29.1"
TORCH ?= torch==2.13.0 torchvision==0.28.0

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	touch $@

$(DEMO_STAMP): pyproject.toml $(VENV)/.torch
	$(VENV)/bin/pip install --quiet -e '.[demo]'
	touch $@

$(STAMP): pyproject.toml $(VENV)/.torch
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# glibc keeps large freed blocks instead of returning them to the kernel at every step: 1.2-1.5x faster
# CPU training and inference here (BENCHMARKS.md).
demo: export MALLOC_MMAP_THRESHOLD_ = 17179869184
demo: export MALLOC_TRIM_THRESHOLD_ = 17179869184
demo: export MALLOC_TOP_PAD_ = 1073741824

.PHONY: demo test test-all
demo: $(DEMO_STAMP)
	$(VENV)/bin/alldetect run --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m ''
