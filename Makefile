# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/valuerank/v1/recommender.proto

.PHONY: demo test venv protos check-protos lint typecheck pytest clean

# (Re)build the virtualenv only when the pins change: idempotent and quick when up to date.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -r requirements.lock
	# PyPI's torchrec requires the CUDA fbgemm-gpu; its CPU twin fbgemm-gpu-cpu is pinned above.
	$(BIN)/python -m pip install -q --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/valuerank demo

test: $(STAMP) check-protos lint typecheck pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Generated code: one command, `-I .` so that import paths equal file paths.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO)

# CI fails when the committed generated code differs from what the .proto produces.
check-protos: $(STAMP)
	rm -rf build/protos-check && mkdir -p build/protos-check
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=build/protos-check \
		--grpc_python_out=build/protos-check --pyi_out=build/protos-check $(PROTO)
	diff -r -x __pycache__ -x '*.proto' -x '__init__.py' build/protos-check/protos/valuerank/v1 protos/valuerank/v1 \
		|| (echo "protos are stale: run 'make protos' and commit" && exit 1)

clean:
	rm -rf $(VENV) build artifacts .pytest_cache .mypy_cache .ruff_cache
