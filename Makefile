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

# asyncckpt against its peers (issue 12): torch.save + one PUT, DCP over s3fs, s3torchconnector,
# torchsnapshot, aioboto3, s3transfer, on moto and localbucket; 3 reps of 192 MiB, ~20-40 minutes.
# The peers live in their own venv, $(PEERS_VENV), pinned by constraints-peers.txt on top of
# constraints.txt (torch==2.13.0+cpu, the local CPU wheel: never another torch build).
PEERS_VENV ?= .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
PEERS_ARGS ?=

$(PEERS_BIN)/.installed: pyproject.toml constraints.txt constraints-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install --quiet -c constraints.txt --upgrade pip
	$(PEERS_BIN)/python -m pip install --quiet -c constraints.txt -c constraints-peers.txt -e '.[server,torch]' \
		torch==2.13.0+cpu s3fs 's3torchconnector[dcp]' torchsnapshot localbucket
	touch $@

.PHONY: bench-peers
bench-peers: $(PEERS_BIN)/.installed
	mkdir -p bench-results
	$(PEERS_BIN)/asyncckpt bench --peers --json bench-results/peers.json $(PEERS_ARGS)

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
	rm -rf $(VENV) $(PEERS_VENV) $(RGW_DIR) .pytest_cache .hypothesis
