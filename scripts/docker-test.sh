#!/usr/bin/env bash
# `make docker-test`: builds the images, brings the compose cluster (docker/compose.yaml)
# up, waits until its 3 instances are healthy, loads it with loadgen from inside the
# compose network and checks loadgen's invariants. Containers, networks and volumes are
# removed at the end, whether a step failed or not. The report and the containers' logs
# are kept in target/docker/test/.
# LOADGEN_RATE, LOADGEN_DURATION_S, LOADGEN_WARMUP_S: the load (default 500 req/s, 15 s).
# KAFKA=1: the same on a tansu broker in the network (docker/compose.kafka.yaml).
# SCENARIO=partition-one | partition-publisher: under that load, cut one instance (the
# third, or the publisher) off the network for PARTITION_S seconds, then heal it
# (scripts/docker-partition.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version > /dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
files=(-f docker/compose.yaml)
work=$PWD/target/docker/test-${SCENARIO:-load}
project=tribunal-test
if [ "${KAFKA:-0}" = 1 ]; then
    files+=(-f docker/compose.kafka.yaml); work=$work-kafka; project=tribunal-test-kafka
fi
compose() { "${COMPOSE[@]}" "${files[@]}" -p "$project" --profile load "$@"; }

scripts/docker.sh
rm -rf "$work" && mkdir -p "$work/report"
# The instances run as uid 10001: the secret and the report folder are theirs.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/psk"
if chown 10001:10001 "$work/psk" "$work/report" 2> /dev/null; then
    chmod 0400 "$work/psk"
else
    # Not root: a throwaway key for this test, readable by the containers' user.
    chmod 0444 "$work/psk" && chmod 0777 "$work/report"
fi
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export TRIBUNAL_PSK_FILE_HOST=$work/psk TRIBUNAL_REPORT_DIR=$work/report
export TRIBUNAL_SECCOMP_PROFILE=$PWD/docker/seccomp-io_uring.json
export TRIBUNAL_PORT_1=$(free_port) TRIBUNAL_PORT_2=$(free_port) TRIBUNAL_PORT_3=$(free_port)
export LOADGEN_RATE=${LOADGEN_RATE:-500} LOADGEN_DURATION_S=${LOADGEN_DURATION_S:-15} LOADGEN_WARMUP_S=${LOADGEN_WARMUP_S:-5}

cleanup() {
    trap '' INT TERM # a second Ctrl-C must not leave the cluster behind
    docker rm -fv "$project-loadgen" > /dev/null 2>&1 || true
    compose logs --no-color > "$work/compose.log" 2>&1 || true
    compose down --volumes --remove-orphans > /dev/null 2>&1 || true
}
trap cleanup EXIT
compose down --volumes --remove-orphans > /dev/null 2>&1 || true

echo "== docker-test: 3 instances up"
compose up -d tribunal-1 tribunal-2 tribunal-3 # and the broker, with KAFKA=1
deadline=$((SECONDS + 180))
while :; do
    states=$(for service in tribunal-1 tribunal-2 tribunal-3; do
        docker inspect --format '{{.State.Health.Status}}' "$(compose ps -q "$service")" 2> /dev/null || echo missing
        done | sort | uniq -c | tr '\n' ' ')
    [ "$states" = "      3 healthy " ] && break
    if [ $SECONDS -ge $deadline ]; then
        echo "docker-test: the instances are not healthy after 180 s: $states" >&2
        compose logs --no-color --tail 30 >&2 || true
        exit 1
    fi
    sleep 1
done
echo "== docker-test: healthy after $((SECONDS + 180 - deadline)) s; loadgen at $LOADGEN_RATE req/s for $LOADGEN_DURATION_S s, inside the network"
case "${SCENARIO:-load}" in
load)
    compose run --rm loadgen > "$work/loadgen.log" 2>&1 || { tail -40 "$work/loadgen.log" >&2; exit 1; }
    ;;
partition-one | partition-publisher)
    source scripts/docker-partition.sh
    partition "$SCENARIO"
    ;;
*)
    echo "docker-test: unknown SCENARIO=$SCENARIO (load, partition-one, partition-publisher)" >&2
    exit 2
    ;;
esac
grep -E "achieved|p50|^ +[0-9]|invariants:" "$work/loadgen.log" || true
python3 - "$work/report/summary.json" "${SCENARIO:-load}" <<'PY'
import json, sys
summary, scenario = json.load(open(sys.argv[1])), sys.argv[2]
assert summary["invariants_ok"], f"invariants failed: {summary['invariants']}"
assert summary["unresolved"] == 0, f"unresolved commands: {summary['unresolved']}"
# Under a partition, requests to the cut-off instance time out and are retried elsewhere.
assert scenario != "load" or summary["errors"] == 0, f"errors: {summary['errors']}"
print(f"docker-test {scenario}: OK, {summary['measured_requests']} requests, p99 {summary['latency_ms']['p99']} ms, "
      f"{summary['retries']} retried, 0 unresolved, invariants OK")
PY
