#!/usr/bin/env bash
# `make run KAFKA=1`: the main job against a real Kafka broker started here (tansu,
# sqlite storage, free port, stopped by PID on exit). A sample workload is produced to
# tribunal.commands ($PARTITIONS partitions), one instance processes it until every
# output is durable and published to tribunal.outputs, then the recovered state and a
# few published outputs are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-100000}
PARTITIONS=${PARTITIONS:-3}
RUN_DIR=${RUN_DIR:-target/run-kafka}
BIN=target/release/tribunal
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
trap 'scripts/kafka-broker.sh stop "$RUN_DIR/broker"' EXIT
port=$(scripts/kafka-broker.sh start "$RUN_DIR/broker")
log="kafka:127.0.0.1:$port"
echo "== broker: tansu on 127.0.0.1:$port (sqlite in $RUN_DIR/broker)"
"$BIN" sample --events "$EVENTS" > "$RUN_DIR/commands.jsonl"
"$BIN" log append --log "$log" --kafka-partitions "$PARTITIONS" "$RUN_DIR/commands.jsonl" | tail -n 1 | sed 's/^/last partition:offset appended: /'
"$BIN" run --expected-copies 1 --log "$log" --data-dir "$RUN_DIR/data" --stop-at-end
echo; echo "== tribunal inspect (the engine's durable state)"
"$BIN" inspect --data-dir "$RUN_DIR/data"
echo; echo "== tribunal.outputs: $("$BIN" log read --log "$log" --topic tribunal.outputs | wc -l) outputs published; the first three:"
# `head` closes the pipe early; that is not a failure.
"$BIN" log read --log "$log" --topic tribunal.outputs | head -n 3 || true
