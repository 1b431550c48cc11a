#!/usr/bin/env bash
# Kafka benchmark: events/s from a pre-filled topic of $EVENTS events through one
# instance to a durable Ledger and published outputs, as measured by the engine itself
# (status.json: records processed / time from ready until everything was durable and
# acknowledged on the outputs topic). In the same run, the broker's raw consume rate
# with a plain rdkafka consumer over the same topic, and the ratio of the two; and the
# rate of a plain consume-and-produce pipe (one record out per record in, acknowledged),
# which is what the broker can serve when it must also take the outputs.
# Figures go to stdout and target/bench/kafka.json.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-500000}
PARTITIONS=${PARTITIONS:-3}
BIN=target/release/tribunal
OUT=target/bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tribunal-bench-kafka.XXXXXX")
trap 'scripts/kafka-broker.sh stop "$WORK/broker"; rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
cargo build --release -p tribunal --example raw_consume >/dev/null 2>&1
cargo build --release -p tribunal >/dev/null

port=$(scripts/kafka-broker.sh start "$WORK/broker")
echo "broker on 127.0.0.1:$port; generating and producing $EVENTS events to $PARTITIONS partitions..."
"$BIN" sample --events "$EVENTS" --skus 10000 --warehouses 20 > "$WORK/commands.jsonl"
"$BIN" log append --log "kafka:127.0.0.1:$port" --kafka-partitions "$PARTITIONS" "$WORK/commands.jsonl" > /dev/null

echo "raw consume (plain rdkafka consumer)..."
raw=$(target/release/examples/raw_consume "127.0.0.1:$port" tribunal.commands)
echo "  $raw"

echo "raw pipe (plain consumer + idempotent producer, one record out per record in)..."
"$BIN" log append --log "kafka:127.0.0.1:$port" --commands-topic pipe.out --kafka-partitions "$PARTITIONS" /dev/null > /dev/null
pipe=$(target/release/examples/raw_consume "127.0.0.1:$port" tribunal.commands --pipe pipe.out)
echo "  $pipe"

echo "engine: durable Ledger + published outputs..."
"$BIN" run --expected-copies 1 --log "kafka:127.0.0.1:$port" --data-dir "$WORK/data" --stop-at-end --snapshot-every 0 2> "$WORK/run.log"
python3 - "$WORK/data/status.json" "$raw" "$EVENTS" "$PARTITIONS" "$OUT/kafka.json" "$pipe" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
raw = json.loads(sys.argv[2])
pipe = json.loads(sys.argv[6])
events, partitions = int(sys.argv[3]), int(sys.argv[4])
processed, ms = status["records_processed"], status["processing_ms"]
engine_rate = processed / (ms / 1000)
published = sum((p.get("published_watermark") or -1) + 1 for p in status["partitions"])
report = {
    "events": events,
    "partitions": partitions,
    "engine_records": processed,
    "engine_published": published,
    "engine_processing_ms": ms,
    "engine_events_per_s": round(engine_rate),
    "raw_consume_records": raw["records"],
    "raw_consume_ms": raw["elapsed_ms"],
    "raw_consume_per_s": round(raw["records_per_s"]),
    "ratio": round(engine_rate / raw["records_per_s"], 3),
    "raw_pipe_per_s": round(pipe["records_per_s"]),
    "ratio_to_pipe": round(engine_rate / pipe["records_per_s"], 3),
    "ledger_syncs": status["ledger_syncs"],
}
assert processed == events and published == events, report
json.dump(report, open(sys.argv[5], "w"), indent=2)
print(json.dumps(report, indent=2))
PY
