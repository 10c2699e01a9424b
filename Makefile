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

# The machine's OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE pin an older kernel; the benchmarks
# run without them (engine.py prints the kernel that runs).
BENCH_ENV := env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE

bench: $(STAMP)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BENCH_ENV) $(BIN)/python bench/engine.py
	$(BENCH_ENV) $(BIN)/python bench/allreduce.py
	$(BENCH_ENV) $(BIN)/python bench/scaling.py
	$(BIN)/python bench/service.py

clean:
	rm -rf $(VENV) .trainq .pytest_cache .ruff_cache
