# The two commands of the README: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := bot adapters chat storage ai_model

.PHONY: run test bootstrap lint bench

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	$(PY) -m bot run

lint: bootstrap
	$(PY) -m ruff check $(PACKAGES) tests
	$(PY) -m ruff format --check $(PACKAGES) tests
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# The storage and core tests also run on a throwaway PostgreSQL (installed when missing); the
# remote-inference tests on a real llama-server (built once from the pinned sources, cached); the
# chat-format tests on the templates and vocabularies llama.cpp vendors (extracted once, cached).
test: lint
	pg_bin="$$(scripts/ensure_postgres.sh)" && \
	llama_server="$$(PYTHON=$(PY) scripts/build_llama_server.sh)" && \
	llama_models="$$(PYTHON=$(PY) scripts/fetch_llama_models.sh)" && \
	LOCALBOT_PG_BIN="$$pg_bin" LOCALBOT_LLAMA_SERVER="$$llama_server" \
	LOCALBOT_LLAMA_MODELS="$$llama_models" $(PY) -m pytest
