#!/bin/sh
# The container image with podman, on a machine with no Docker engine that reaches no image registry, only
# Debian's packages (this project's CI): `make image` and tests/image/test_image.py use it.
#
#   podman.sh build     podman, debootstrap and runc from apt-get where missing; a Debian bookworm base
#                       image made by debootstrap (once; localhost/debian:bookworm); then the Dockerfile
#                       built with `--isolation chroot`, torch from the CPU wheel pip's configuration points
#                       at (find-links) when there is one, so no CUDA build of torch is downloaded
#   podman.sh run ARGS  `podman run ARGS` with what makes it run here: runc (crun refuses this host's hybrid
#                       cgroups) and the open-files and processes limits set to this host's hard limits
#                       (podman's defaults exceed them, and raising one is not permitted here)
#
# Settings (environment): IMAGE_TAG (localhost/hotlora:cpu), BASE_IMAGE (localhost/debian:bookworm, made
# here; python:3.11-slim-bookworm where a registry is reachable), VARIANT (cpu), TORCH_WHEELS (a folder
# holding torch's wheel; default: found through pip's find-links), DEBIAN_MIRROR (http://deb.debian.org/debian).
set -eu

TAG=${IMAGE_TAG:-localhost/hotlora:cpu}
BASE=${BASE_IMAGE:-localhost/debian:bookworm}
VARIANT=${VARIANT:-cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

say() { printf '==> %s\n' "$*"; }

need_packages() {
    missing=""
    command -v podman >/dev/null 2>&1 || missing="$missing podman"
    command -v runc >/dev/null 2>&1 || missing="$missing runc"
    case "$BASE" in localhost/debian:*) command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap" ;; esac
    if [ -n "$missing" ]; then
        say "installing from Debian's packages:$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        # shellcheck disable=SC2086 # a list of package names
        apt-get install -y -q $missing
    fi
}

# A folder holding the CPU wheel of torch that pip's configuration points at (find-links), if any.
torch_wheels() {
    if [ -n "${TORCH_WHEELS:-}" ]; then
        echo "$TORCH_WHEELS"
        return
    fi
    links=$(python3 -m pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p")
    for dir in ${PIP_FIND_LINKS:-} $links; do
        dir=${dir#file://}
        if ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl >/dev/null 2>&1; then
            echo "$dir"
            return
        fi
    done
}

debian_base() {
    if podman image exists "$BASE"; then
        return
    fi
    suite=${BASE#localhost/debian:}
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/hotlora-debootstrap.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    say "the base image $BASE: debootstrap --variant=minbase $suite from $MIRROR (a few minutes, once)"
    debootstrap --variant=minbase "$suite" "$rootfs" "$MIRROR"
    tar -C "$rootfs" -c . | podman import - "$BASE"
    rm -rf "$rootfs"
    trap - EXIT
}

hard_limit() { # this process's hard limit of `Max processes` or `Max open files`, as --ulimit wants it
    awk -v what="$1" 'index($0, what) == 1 { v = $(NF - 1); print (v == "unlimited" ? -1 : v) }' /proc/self/limits
}

case "${1:-}" in
build)
    need_packages
    case "$BASE" in localhost/debian:*) debian_base ;; esac
    set -- --build-arg "BASE_IMAGE=$BASE" --build-arg "VARIANT=$VARIANT" --build-arg "TORCH_VERSION=$TORCH_VERSION"
    wheels=$([ "$VARIANT" = cpu ] && torch_wheels || true)
    if [ -n "$wheels" ]; then
        say "torch from $wheels ($(cd "$wheels" && ls torch-"$TORCH_VERSION"+cpu-*.whl | head -1)), the rest from PyPI"
        set -- "$@" --build-context "wheels=$wheels" --build-arg TORCH_INDEX_URL=
    elif [ -n "${TORCH_INDEX_URL:-}" ]; then
        set -- "$@" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"
    fi
    cert=${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'$/\1/p")}
    if [ -n "$cert" ]; then
        say "pip's CA bundle $cert, as the build secret pip-cert"
        set -- "$@" --secret "id=pip-cert,src=$cert"
    fi
    say "podman build -t $TAG (base $BASE, variant $VARIANT)"
    start=$(date +%s)
    # --format docker: the OCI format has no HEALTHCHECK
    podman build --isolation chroot --format docker "$@" -t "$TAG" -f "$ROOT/Dockerfile" "$ROOT"
    size=$(podman image inspect --format '{{.Size}}' "$TAG")
    say "built $TAG: $((size / 1000000)) MB in $(($(date +%s) - start)) s"
    ;;
run)
    shift
    nofile=$(hard_limit "Max open files")
    nproc=$(hard_limit "Max processes")
    pid_max=$(cat /proc/sys/kernel/pid_max)
    if [ "$nproc" = -1 ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
    # without systemd, podman cannot time the image's HEALTHCHECK (`podman healthcheck run` still runs it)
    if [ ! -d /run/systemd/system ]; then set -- --health-interval disable "$@"; fi
    exec podman run --runtime runc --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" "$@"
    ;;
*)
    sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
