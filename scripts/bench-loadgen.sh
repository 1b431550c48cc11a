#!/usr/bin/env bash
# `make bench`: a 3-instance cluster with the REST API on this machine, driven by loadgen
# at $RATE requests/s for $DURATION s (after a $WARMUP s warm-up), open loop, with the
# invariants checked at the end. The report (summary.json, latency.hgrm, latency.svg,
# ledger.json, stock.json) and each instance's /metrics go to $OUT.
# KAFKA=1: the same through a tansu broker started here (one partition).
# PROFILE=1: also `perf record -a -g` for $PROFILE_S s inside the measured window, and
# where the box's CPU went (scripts/perf-breakdown.py) in $OUT/profile.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-10000}
DURATION=${DURATION:-60}
WARMUP=${WARMUP:-10}
CONNECTIONS=${CONNECTIONS:-256}
INSTANCES=3
KAFKA=${KAFKA:-0}
if [ "$KAFKA" = 1 ]; then OUT=${OUT:-target/bench/loadgen-kafka}; else OUT=${OUT:-target/bench/loadgen}; fi
BIN=${BIN:-target/release}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tribunal-bench-loadgen.XXXXXX")
cluster_pid=
cleanup() {
    if [ -n "$cluster_pid" ]; then kill -TERM "$cluster_pid" 2>/dev/null || true; wait "$cluster_pid" 2>/dev/null || true; fi
    if [ "$KAFKA" = 1 ]; then scripts/kafka-broker.sh stop "$WORK/broker" || true; fi
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# BIN=DIR: run the tribunal and loadgen binaries in DIR (another build, to compare)
# instead of building target/release.
[ "$BIN" != target/release ] || cargo build --release -p tribunal -p tribunal-loadgen
rm -rf "$OUT" && mkdir -p "$OUT"
if [ "$KAFKA" = 1 ]; then
    port=$(scripts/kafka-broker.sh start "$WORK/broker")
    log="kafka:127.0.0.1:$port"
    echo "== broker: tansu on 127.0.0.1:$port"
else
    log="local:$WORK/log"
fi
http=$(python3 -c 'import socket
for _ in range(100):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); base = s.getsockname()[1]; s.close()
    try:
        held = []
        for p in range(base, base + 3):
            t = socket.socket(); t.bind(("127.0.0.1", p)); held.append(t)
        print(base); break
    except OSError: pass')
[ -n "$http" ] || { echo "no 3 consecutive free ports for the REST API" >&2; exit 1; }
echo "== tribunal cluster: $INSTANCES instances on $log, REST API on ports $http.."
"$BIN/tribunal" cluster --instances "$INSTANCES" --log "$log" --data-dir "$WORK/cluster" \
    --http-base-port "$http" > "$OUT/cluster.log" 2>&1 &
cluster_pid=$!
targets=()
for i in $(seq 0 $((INSTANCES - 1))); do targets+=(--target "http://127.0.0.1:$((http + i))"); done

echo "== loadgen: $RATE requests/s for $DURATION s after $WARMUP s of warm-up, $CONNECTIONS connections"
profile_pid=
if [ "${PROFILE:-0}" = 1 ]; then
    command -v perf > /dev/null || { echo "PROFILE=1 needs perf (Debian: linux-perf)" >&2; exit 1; }
    PROFILE_S=${PROFILE_S:-10}
    # The opening stock takes a few seconds before the warm-up starts.
    ( sleep $((WARMUP + 5)) && perf record -a -g -F 499 -o "$OUT/perf.data" -- sleep "$PROFILE_S" \
        > "$OUT/perf-record.log" 2>&1 ) &
    profile_pid=$!
fi
status=0
"$BIN/loadgen" run "${targets[@]}" --rate "$RATE" --duration-s "$DURATION" --warmup-s "$WARMUP" \
    --connections "$CONNECTIONS" --out-dir "$OUT" ${LOADGEN_ARGS:-} || status=$?
for i in $(seq 0 $((INSTANCES - 1))); do
    curl -s "http://127.0.0.1:$((http + i))/metrics" > "$OUT/metrics-instance-$((i + 1)).txt" || true
done
if [ -n "$profile_pid" ]; then
    wait "$profile_pid" || { echo "perf record failed:" >&2; cat "$OUT/perf-record.log" >&2; exit 1; }
    scripts/perf-breakdown.py "$OUT/perf.data" | tee "$OUT/profile.txt"
fi
echo "== report in $OUT (summary.json, latency.hgrm, latency.svg; server-side histograms in metrics-instance-*.txt)"
exit "$status"
