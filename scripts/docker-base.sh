#!/usr/bin/env bash
# Builds the base image the Dockerfile's FROM names (tribunal-base:bookworm) on this
# machine, with no registry: debootstrap a minimal Debian bookworm (the glibc the host
# builds the binaries against) into a folder, then `docker import` it. Does nothing if the
# image exists (FORCE=1 rebuilds it). Needs root and debootstrap (installed if missing).
set -euo pipefail
IMAGE=${BASE_IMAGE:-tribunal-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" > /dev/null 2>&1; then
    echo "base image $IMAGE exists"
    exit 0
fi
# debootstrap, and reading the root file system it makes, need root.
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v debootstrap > /dev/null; then
    echo "installing debootstrap (Debian package)"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap > /dev/null
fi
host_glibc=$(ldd --version | head -1 | grep -oE '[0-9]+\.[0-9]+$')
if [ "$host_glibc" != 2.36 ]; then
    echo "the host's glibc is $host_glibc and bookworm's is 2.36: binaries built on this host would not run in the image; build on Debian bookworm" >&2
    exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "$keyring is missing (Debian's debian-archive-keyring): the packages could not be verified" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/tribunal-base.XXXXXX")
trap '$SUDO rm -rf "$root"' EXIT
echo "debootstrap --variant=minbase $SUITE (a few minutes)"
$SUDO debootstrap --variant=minbase --keyring="$keyring" "$SUITE" "$root" "$MIRROR" > "$root.log" 2>&1 || {
    tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# What a container never needs: package caches, docs, manuals, locales but C.
$SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
$SUDO find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C*' -exec rm -rf {} + 2>/dev/null || true
$SUDO tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$IMAGE" > /dev/null
echo "base image $IMAGE: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}')"
