# Two commands do all set-up on a fresh machine (Python >= 3.11 and make):
#   make demo   - a simulated 4-node training job checkpointing to an embedded S3 endpoint
#   make test   - the test-suite (real S3 HTTP endpoint: moto's server on 127.0.0.1)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/asyncckpt demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/asyncckpt bench

# issue 9's counts and ratios at scale (1024 nodes, 32 processes, 1 GiB): 2-5 minutes
.PHONY: bench-scale
bench-scale: $(BIN)/.installed
	mkdir -p bench-results
	$(BIN)/asyncckpt bench --scale --json bench-results/scale.json

# mypy --strict and ruff (lint rules, ASYNC included, and the formatter's check)
.PHONY: lint
$(BIN)/.lint-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	touch $@

lint: $(BIN)/.lint-installed
	$(BIN)/python -m mypy asyncckpt
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
