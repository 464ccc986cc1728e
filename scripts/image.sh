#!/usr/bin/env bash
# The container image, built with podman: `scripts/image.sh build` (what `make image` runs).
#
# BASE_IMAGE=python:3.12-slim (or any Debian-like image with python3 and its venv module)
# builds from that base. Without it, the base is Debian bookworm made here with debootstrap,
# for machines that reach Debian's mirror and PyPI but no container registry; it is made once
# and kept as localhost/fusion-gateway-base:bookworm (`podman rmi` it to make it afresh).
#
# IMAGE names the result (localhost/fusion-gateway:latest); DEBIAN_MIRROR the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/fusion-gateway:latest}
LOCAL_BASE=localhost/fusion-gateway-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# podman's settings for this kind of machine, without touching /etc (see the file).
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}

make_local_base() {
    if podman image exists "$LOCAL_BASE"; then
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        echo "image.sh: debootstrap is needed (apt-get install debootstrap), or set BASE_IMAGE" >&2
        exit 1
    fi
    local root
    root=$(mktemp -d /var/tmp/fusion-gateway-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "image.sh: making $LOCAL_BASE with debootstrap (once; a few minutes)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" >&2
    # As in Debian's official images: no downloaded packages, no package lists (90 MB).
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
        "$root"/var/lib/apt/lists/*
    # What the official python images set too; an imported image has no environment at all.
    tar -C "$root" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        - "$LOCAL_BASE" >/dev/null
    rm -rf "$root"
    trap - EXIT
}

build() {
    local base=${BASE_IMAGE:-}
    if [[ -z $base ]]; then
        make_local_base
        base=$LOCAL_BASE
    fi
    local secret=()
    # Behind a proxy that inspects TLS, pip in the build trusts what this machine trusts (pip's
    # PIP_CERT, else the system's CAs). A build secret: it is mounted for the one step that
    # downloads, and no layer keeps it.
    local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    if [[ -f $ca ]]; then
        secret=(--secret "id=pip_cert,src=$ca")
    fi
    # --format docker: the OCI format has no HEALTHCHECK. --network host: the build stage
    # downloads from PyPI without podman having to set up a network.
    podman build --format docker --network host "${secret[@]}" \
        --build-arg "BASE_IMAGE=$base" --tag "$IMAGE" .
}

case ${1:-} in
    build) build ;;
    *)
        echo "usage: scripts/image.sh build" >&2
        exit 2
        ;;
esac
