# syntax=docker/dockerfile:1
#
# hotlora server image (docs/operations.md, "Container image"). Its steps: deploy/image/base.sh and build.sh.
#   make image                                 podman, from a Debian bookworm made here by debootstrap
#   docker build -t hotlora:cpu .              python:3.11-slim-bookworm, torch 2.13.0 CPU
#   docker build -t hotlora:cuda --build-arg VARIANT=cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# Build arguments: BASE_IMAGE (any Debian or Ubuntu image; Python 3 comes from apt where it has none),
# VARIANT (cpu: the C kernels built here and shipped, no compiler at run time; cuda: gcc and Python's headers
# kept, since Triton compiles its launcher on the GPU host), TORCH_INDEX_URL (empty = PyPI and the wheels of
# the `wheels` build context: `--build-context wheels=DIR` brings a local torch wheel). Behind a proxy that
# re-signs TLS, `--secret id=pip-cert,src=CA_BUNDLE` gives pip its certificates.
# Run (a tokens file is required to listen on anything but 127.0.0.1):
#   docker run -p 50051:50051 -p 8000:8000 -p 9400:9400 -v hotlora-data:/data \
#     -v "$PWD/tokens:/etc/hotlora/tokens:ro" hotlora:cpu --host 0.0.0.0 --tokens-file /etc/hotlora/tokens
# The default model (SmolLM2-135M-Instruct) is dequantized at build time into /opt/hotlora/cache.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# Wheels to install torch from (none by default): `--build-context wheels=DIR` replaces this empty stage.
FROM scratch AS wheels

# ---- base: Python >= 3.11 and an empty venv, on the chosen base image ----------------------------
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS base
ARG VARIANT=cpu
COPY deploy/image/base.sh /usr/local/lib/hotlora/base.sh
RUN sh /usr/local/lib/hotlora/base.sh python "${VARIANT}"

# ---- build: dependencies, gRPC stubs, the project's wheel, the C kernels, the default model -------
FROM base AS build
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /src
RUN sh /usr/local/lib/hotlora/base.sh compiler
# dependencies first, from pyproject.toml alone: a source change does not reinstall them
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml ./
COPY deploy/gpu/pins_to_install.py deploy/gpu/
COPY deploy/image/build.sh deploy/image/
RUN --mount=type=bind,from=wheels,target=/wheels --mount=type=secret,id=pip-cert \
    sh deploy/image/build.sh deps "${TORCH_VERSION}" "${TORCH_INDEX_URL}"
COPY proto/ proto/
COPY README.md ./
COPY hotlora/ hotlora/
COPY server/ server/
COPY adapters/ adapters/
COPY kernels/ kernels/
COPY clients/ clients/
RUN sh deploy/image/build.sh wheel dist
RUN --mount=type=secret,id=pip-cert sh deploy/image/build.sh install dist
RUN sh deploy/image/build.sh kernels kernels-built
# the cache is private to its writer (0700); the server runs as another user and only reads it
RUN hotlora prepare-model --cache-dir /opt/hotlora/cache && chmod -R a+rX /opt/hotlora/cache

# ---- runtime ------------------------------------------------------------------------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="hotlora" \
      org.opencontainers.image.description="gRPC server for many tenants' LoRA adapters on one resident base model" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/hotlora/cache /opt/hotlora/cache
COPY --from=build /src/kernels-built /opt/hotlora/kernels
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
    HOTLORA_KERNELS_DIR=/opt/hotlora/kernels \
    HOTLORA_DATA_DIR=/data \
    HOTLORA_CACHE_DIR=/opt/hotlora/cache \
    HOTLORA_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/hotlora
VOLUME ["/data"]
# gRPC (hotlora.v1, KServe, health, reflection), the OpenAI HTTP door, Prometheus /metrics
EXPOSE 50051 8000 9400
# exit 0 only when grpc.health.v1 says SERVING (NOT_SERVING while loading and draining)
HEALTHCHECK --interval=15s --timeout=15s --start-period=120s --retries=3 \
    CMD ["hotlora", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["hotlora", "serve"]
CMD []
