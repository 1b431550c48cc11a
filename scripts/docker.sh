#!/usr/bin/env bash
# `make docker`: the tribunal image. Builds the base image if it is missing
# (scripts/docker-base.sh), the release binaries on the host, strips them into the build
# context target/docker/context with docker/healthcheck.sh, and builds docker/Dockerfile
# as tribunal:latest.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-tribunal:latest}
scripts/docker-base.sh
cargo build --release -p tribunal -p tribunal-loadgen
context=target/docker/context
rm -rf "$context" && mkdir -p "$context"
for binary in tribunal loadgen; do
    strip --strip-debug -o "$context/$binary" "target/release/$binary"
done
cp docker/healthcheck.sh "$context/"
docker build --quiet -f docker/Dockerfile -t "$IMAGE" "$context" > /dev/null
size_of() { docker image inspect "$1" --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}'; }
docker run --rm "$IMAGE" --version > /dev/null || { echo "the binaries do not run in $IMAGE" >&2; exit 1; }
echo "image $IMAGE: $(size_of "$IMAGE")"
# The Kafka variant's broker, from the tansu that `make tools` installs.
tansu=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
if [ -x "$tansu" ]; then
    broker_context=target/docker/tansu-context
    rm -rf "$broker_context" && mkdir -p "$broker_context"
    strip --strip-debug -o "$broker_context/tansu" "$tansu"
    docker build --quiet -f docker/Dockerfile.tansu -t tribunal-tansu:latest "$broker_context" > /dev/null
    echo "image tribunal-tansu:latest: $(size_of tribunal-tansu:latest)"
else
    echo "no tansu here (make tools installs it): the Kafka variant's broker image is not built"
fi
