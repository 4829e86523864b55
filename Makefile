# The README's two set-up commands are `make serve` and `make test`; both create
# .venv when missing and are fast when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
export MODULESERVE_DB ?= sqlite:///$(CURDIR)/$(DATA)/registry.db
export MODULESERVE_STORE ?= $(CURDIR)/$(DATA)/store

.PHONY: venv serve demo test lint typecheck format proto check-proto clean

venv: $(STAMP)

# torch first, pinned by constraints.txt, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moduleserve-registry init
	$(BIN)/moduleserve-registry demo

# The demo server on 127.0.0.1:8001 (metrics on :8002), in the foreground until Ctrl-C.
serve: demo
	$(BIN)/moduleserve-server $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy --strict on registry and client, configured in pyproject.toml's [tool.mypy].
typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

PROTOS := $(wildcard proto/*.proto)

proto: $(STAMP)
	$(if $(PROTOS),$(BIN)/python -m grpc_tools.protoc -Iclient/pb=proto --python_out=. \
		--pyi_out=. --grpc_python_out=. $(PROTOS),@echo "no .proto files")

# Regenerates the stubs and fails when the committed ones were stale.
check-proto: proto
	git diff --exit-code -- client/pb
	test -z "$$(git status --porcelain -- client/pb)"

clean:
	rm -rf $(VENV) $(DATA)
