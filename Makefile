# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench train clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/trainq up

train: $(STAMP)
	$(BIN)/trainq train examples/digits_cnn.json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/transformer.py
	$(BIN)/python bench/allreduce.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/service.py

clean:
	rm -rf $(VENV) .trainq .pytest_cache .ruff_cache
