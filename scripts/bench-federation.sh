#!/usr/bin/env bash
# Federation benchmark: the cost of certification, measured by the engine
# itself (status.json: records processed / time from ready to every record certified,
# published and confirmed by the peers), not by a wrapper.
#   1. A 3-instance cluster (expected_copies 2) on a pre-filled local log.
#   2. One instance with expected_copies 1 on an identical log, in the same run.
# Certified events/s of each and their ratio go to stdout and target/bench/federation.json.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-300000}
BIN=target/release/tribunal
OUT=target/bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tribunal-bench-fed.XXXXXX")
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
cargo build --release -p tribunal >/dev/null

echo "generating and appending $EVENTS events (twice: one log per run, each with its own outputs log)..."
"$BIN" sample --events "$EVENTS" --skus 10000 --warehouses 20 > "$WORK/commands.jsonl"
"$BIN" log append --log "local:$WORK/log-cluster" "$WORK/commands.jsonl" > /dev/null
"$BIN" log append --log "local:$WORK/log-single" "$WORK/commands.jsonl" > /dev/null

field() { python3 -c "import json,sys; s=json.load(open(sys.argv[2] + '/status.json')); print(s[sys.argv[1]])" "$1" "$2"; }

# CPU (user + system) of a command and every process it waited for, in µs; its output
# goes to the log file given first, whose end is shown if the command fails.
cpu_us() {
    python3 - "$@" <<'PY'
import resource, subprocess, sys
log, command = sys.argv[1], sys.argv[2:]
with open(log, "w") as out:
    code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
if code != 0:
    sys.stderr.write("".join(open(log).readlines()[-30:]))
    sys.exit(f"{command[0]} {command[1]} failed (exit {code}); its output: {log}")
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(round((usage.ru_utime + usage.ru_stime) * 1e6))
PY
}

echo "3 instances, expected_copies 2..."
cluster_cpu_us=$(cpu_us "$WORK/cluster.out" "$BIN" cluster --instances 3 --log "local:$WORK/log-cluster" --data-dir "$WORK/cluster" \
    --stop-at-end --snapshot-every 0)
cluster_ms=0
for i in 1 2 3; do
    ms=$(field processing_ms "$WORK/cluster/instance-$i")
    if [ "$ms" -gt "$cluster_ms" ]; then cluster_ms=$ms; fi
done
echo "1 instance, expected_copies 1..."
single_cpu_us=$(cpu_us "$WORK/single.log" "$BIN" run --expected-copies 1 --log "local:$WORK/log-single" --data-dir "$WORK/single" \
    --stop-at-end --snapshot-every 0)
single_ms=$(field processing_ms "$WORK/single")
python3 - "$EVENTS" "$cluster_ms" "$single_ms" "$OUT/federation.json" "$cluster_cpu_us" "$single_cpu_us" <<'PY'
import json, sys
events, cluster_ms, single_ms, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cluster_cpu_us, single_cpu_us = int(sys.argv[5]), int(sys.argv[6])
cluster = events * 1000 / cluster_ms
single = events * 1000 / single_ms
result = {
    "events": events,
    "cluster_3x_expected_2_certified_events_per_s": round(cluster),
    "single_expected_1_certified_events_per_s": round(single),
    "ratio_cluster_over_single": round(cluster / single, 3),
    # The bulk path's cost: CPU (user + system, every instance, start-up and recovery
    # included) per event, what the serving path's cpu_us_per_request is compared with.
    "cluster_cpu_us_per_event": round(cluster_cpu_us / events, 1),
    "single_cpu_us_per_event": round(single_cpu_us / events, 1),
}
json.dump(result, open(out, "w"), indent=2)
print(f"3 instances, expected_copies 2: {cluster:,.0f} certified events/s ({cluster_ms} ms)")
print(f"1 instance,  expected_copies 1: {single:,.0f} certified events/s ({single_ms} ms)")
print(f"ratio (the cost of certification on one 2-core host): {cluster / single:.2f}")
print(f"CPU per event: 3 instances {cluster_cpu_us / events:.1f} µs, 1 instance {single_cpu_us / events:.1f} µs")
PY
