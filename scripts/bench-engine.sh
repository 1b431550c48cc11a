#!/usr/bin/env bash
# Engine benchmark: durable throughput and recovery time, measured by the
# engine itself (status.json), not by a wrapper.
#   1. 1,000,000 mixed events pre-filled in a local log, then `tribunal run` on every
#      allowed core until every record is durable: records / processing time.
#   2. A restart on that data dir with nothing new to read: time from start to ready
#      (reading and replaying the 1,000,000-event Ledger, no snapshot).
#   3. The same log into a second data dir with a snapshot every 900,000 records, then
#      a restart: time to ready from the snapshot plus the Ledger after it.
# Figures go to stdout and target/bench/engine.json.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-1000000}
BIN=target/release/tribunal
OUT=target/bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tribunal-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
cargo build --release -p tribunal >/dev/null

echo "generating and appending $EVENTS events..."
"$BIN" sample --events "$EVENTS" --skus 10000 --warehouses 20 > "$WORK/commands.jsonl"
"$BIN" log append --log "local:$WORK/log" "$WORK/commands.jsonl" > /dev/null

status() { python3 -c "import json,sys; s=json.load(open(sys.argv[2] + '/status.json')); print(s[sys.argv[1]])" "$1" "${2:-$WORK/data}"; }

echo "processing..."
"$BIN" run --expected-copies 1 --log "local:$WORK/log" --data-dir "$WORK/data" --stop-at-end --snapshot-every 0 2> "$WORK/run.log"
processed=$(status records_processed)
processing_ms=$(status processing_ms)
syncs=$(status ledger_syncs)
echo "recovering (no snapshot)..."
"$BIN" run --expected-copies 1 --log "local:$WORK/log" --data-dir "$WORK/data" --stop-at-end --snapshot-every 0 2> "$WORK/restart.log"
recovery_ms=$(status recovery_ms)
durable=$(status durable_watermark)
echo "processing with snapshots, then recovering from the snapshot..."
"$BIN" run --expected-copies 1 --log "local:$WORK/log" --data-dir "$WORK/snap" --stop-at-end --snapshot-every 900000 2> "$WORK/run-snap.log"
"$BIN" run --expected-copies 1 --log "local:$WORK/log" --data-dir "$WORK/snap" --stop-at-end --snapshot-every 900000 2> "$WORK/restart-snap.log"
recovery_snapshot_ms=$(status recovery_ms "$WORK/snap")

python3 - "$processed" "$processing_ms" "$syncs" "$recovery_ms" "$durable" "$(nproc)" "$recovery_snapshot_ms" <<'PY' | tee "$OUT/engine.json"
import json, sys
processed, processing_ms, syncs, recovery_ms, durable, cores, recovery_snapshot_ms = (int(x) for x in sys.argv[1:])
print(json.dumps({
    "events": processed,
    "cores": cores,
    "processing_ms": processing_ms,
    "durable_events_per_s": round(processed / max(processing_ms, 1) * 1000),
    "ledger_fdatasyncs": syncs,
    "recovery_no_snapshot_ms": recovery_ms,
    "recovery_with_snapshot_ms": recovery_snapshot_ms,
    "durable_watermark": durable,
}, indent=2))
PY
# `head` closing the pipe early is not a failure.
"$BIN" inspect --data-dir "$WORK/snap" | head -6 || true
