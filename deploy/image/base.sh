#!/bin/sh
# The container image's system steps (Dockerfile), apart from deploy/image/build.sh so that editing the
# Python build steps does not rebuild the base:
#   python VARIANT   Python 3 and an empty venv in /opt/venv (apt-get only where the base image has no python3);
#                    VARIANT cuda also keeps gcc and Python's headers: Triton compiles its launcher on first use
#   compiler         gcc and g++ for the C kernels and their bindings (the build stage only), and Python's
#                    headers (the bindings include Python.h), where the base image has none
set -eu

say() { printf '==> %s\n' "$*"; }

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@"
    rm -rf /var/lib/apt/lists/*
}

step=${1:?usage: base.sh python VARIANT | base.sh compiler}
case "$step" in
python)
    variant=${2:-cpu}
    if ! command -v python3 >/dev/null 2>&1; then
        say "Python 3 from the base image's packages"
        apt_install python3 python3-venv
    fi
    if [ "$variant" = cuda ]; then
        say "gcc and Python's headers: Triton compiles its CUDA launcher on first use"
        apt_install gcc libc6-dev python3-dev
    fi
    python3 -c 'import sys; assert sys.version_info >= (3, 11), f"hotlora needs Python >= 3.11: {sys.version}"'
    python3 -m venv /opt/venv
    say "$(/opt/venv/bin/python --version) in /opt/venv"
    ;;
compiler)
    missing=""
    command -v gcc >/dev/null 2>&1 || missing="gcc libc6-dev"
    command -v g++ >/dev/null 2>&1 || missing="$missing g++"
    # the venv's Python.h (its include folder is the base interpreter's)
    /opt/venv/bin/python -c 'import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing="$missing python3-dev"
    if [ -n "$missing" ]; then
        say "$missing for the C kernels (this stage only: the runtime image gets the built module)"
        # shellcheck disable=SC2086 # one word a package
        apt_install $missing
    fi
    say "$(gcc --version | head -1); $(g++ --version | head -1)"
    ;;
*)
    echo "base.sh: unknown step '$step'" >&2
    exit 2
    ;;
esac
