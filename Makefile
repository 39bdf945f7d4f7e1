# Two commands on a fresh machine: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on disk here; a loose pin would download a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup serve test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]" $(TORCH_PIN)
	touch $(STAMP)

serve: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" container/serve

test: lint
	$(BIN)/python -m pytest -q --durations=15

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache
