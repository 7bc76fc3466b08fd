# The two commands of the README: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := bot adapters storage ai_model

.PHONY: run test bootstrap lint bench

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	$(PY) -m bot run

lint: bootstrap
	$(PY) -m ruff check $(PACKAGES) tests
	$(PY) -m ruff format --check $(PACKAGES) tests
	$(PY) -m mypy

# The storage and core tests also run on a throwaway PostgreSQL (installed when missing).
test: lint
	LOCALBOT_PG_BIN="$$(scripts/ensure_postgres.sh)" $(PY) -m pytest
