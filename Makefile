# The README's two set-up commands are `make serve` and `make test`; both create
# .venv when missing and are fast when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
export MODULESERVE_DB ?= sqlite:///$(CURDIR)/$(DATA)/registry.db
export MODULESERVE_STORE ?= $(CURDIR)/$(DATA)/store

.PHONY: venv serve demo test lint typecheck format proto check-proto clean mutants

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
# --load-all: every model is loaded and warmed up before it says it is serving (as Triton).
serve: demo
	$(BIN)/moduleserve-server --load-all $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Mutation testing (cosmic-ray, in place) of the modules that carry guarantees, each against
# the tests mapped to it in tests/mutation.py: minutes to most of an hour a module, not in CI.
# MODULE=server/security.py for one (several: space-separated); MUTANTS_ARGS="--limit 5" and
# the like (tests/mutation.py --help). Prints a score table, writes build/mutants/report.json.
mutants: $(STAMP)
	$(BIN)/python tests/mutation.py $(MODULE) $(MUTANTS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy --strict on moduleserve.registry and moduleserve.client, configured in pyproject.toml's
# [tool.mypy]. mypy cannot follow the editable install's import hook, so a symlink tree under
# build/typecheck gives it the installed names.
TYPECHECK := build/typecheck/moduleserve

typecheck: $(STAMP)
	mkdir -p $(TYPECHECK)
	ln -sfn $(CURDIR)/client $(TYPECHECK)/client
	ln -sfn $(CURDIR)/registry $(TYPECHECK)/registry
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

PROTOS := $(wildcard proto/*.proto)

PROTO_TMP := build/proto

# Generated as moduleserve/client/pb/*, so that their own imports read
# `from moduleserve.client.pb import ...`, then copied into client/pb (installed under that name).
proto: $(STAMP)
	$(if $(PROTOS),rm -rf $(PROTO_TMP) && mkdir -p $(PROTO_TMP) \
		&& $(BIN)/python -m grpc_tools.protoc -Imoduleserve/client/pb=proto \
		--python_out=$(PROTO_TMP) --pyi_out=$(PROTO_TMP) --grpc_python_out=$(PROTO_TMP) $(PROTOS) \
		&& cp $(PROTO_TMP)/moduleserve/client/pb/*_pb2*.py* client/pb/,@echo "no .proto files")

# Regenerates the stubs and fails when the committed ones were stale.
check-proto: proto
	git diff --exit-code -- client/pb
	test -z "$$(git status --porcelain -- client/pb)"

clean:
	rm -rf $(VENV) $(DATA)
