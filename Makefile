# Ops-Core: `make run` serves, `make test` checks everything CI checks.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/opspawn/opscore/v1/*.proto)

.PHONY: run test proto check-generated lint typecheck buf unit bench bench-peers clean

$(STAMP): pyproject.toml sdk/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./sdk -e '.[dev]'
	touch $(STAMP)

## Serve on 127.0.0.1:50051 with ./opscore.db (override with OPSCORE_* env vars).
run: $(STAMP)
	$(BIN)/opscore serve

## Regenerate sdk/generated/ from protos/ (commit the result).
proto: $(STAMP)
	scripts/gen_protos.sh sdk/generated

## Fail when sdk/generated/ differs from what the protos produce.
check-generated: $(STAMP)
	scripts/check_generated.sh

buf: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	scripts/check_breaking.sh

lint: $(STAMP)
	$(BIN)/ruff check opscore sdk tests bench
	$(BIN)/ruff format --check opscore sdk tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: check-generated buf lint typecheck unit

## Benchmarks (not part of `make test`); results go in bench/README.md.
bench: $(STAMP)
	$(PY) -m bench.run_all

## Start-and-await against Celery and Restate (../shared/peers), interleaved; prints ratios.
bench-peers: $(STAMP)
	$(PY) -m bench.peers

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
