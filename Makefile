# Two commands do all set-up on a fresh machine (Python >= 3.11 and make):
#   make demo      - a simulated 4-node training job checkpointing to an embedded S3 endpoint
#   make test      - the test-suite (real S3 HTTP endpoint: moto's server on 127.0.0.1)
# and one more needs root on Debian/Ubuntu (it apt-gets Ceph):
#   make test-rgw  - the test-suite against a single-host Ceph RGW on 127.0.0.1 (scripts/ceph_rgw.sh)
# Every target installs the exact versions pinned in constraints.txt.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RGW_DIR ?= .rgw
PYTEST_ARGS ?=

.PHONY: demo test test-rgw bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/asyncckpt demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The whole suite against RGW: the tests that talk to S3 (those parametrised on s3 and the
# s3-only ones) reach it through ASYNCCKPT_TEST_S3_ENDPOINT; the rest run as under `make test`.
# The cluster lives in $(RGW_DIR) and is stopped at the end, pass or fail.
test-rgw: $(BIN)/.installed
	scripts/ceph_rgw.sh install
	scripts/ceph_rgw.sh run $(RGW_DIR) -- $(BIN)/python -m pytest -q $(PYTEST_ARGS)

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
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[lint]'
	touch $@

lint: $(BIN)/.lint-installed
	$(BIN)/python -m mypy asyncckpt
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	if [ -d $(RGW_DIR) ]; then scripts/ceph_rgw.sh stop $(RGW_DIR); fi
	rm -rf $(VENV) $(RGW_DIR) .pytest_cache .hypothesis
