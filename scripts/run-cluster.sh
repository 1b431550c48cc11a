#!/usr/bin/env bash
# `make run`: the main job on the embedded local log. A sample workload is appended to a
# local log in $RUN_DIR, a 3-instance federation (`tribunal cluster`) processes it until
# every instance has every record durable, then each instance's recovered state digest is
# compared with the sequential reference's, and the certified outputs the federation
# published to the local log $RUN_DIR/log/outputs are counted.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-100000}
RUN_DIR=${RUN_DIR:-target/run}
INSTANCES=3
BIN=target/release/tribunal
log="local:$RUN_DIR/log"

# JSON fields: jq if there is one, python3 otherwise.
if command -v jq > /dev/null; then
  field() { jq -r ".$2 // \"none\"" "$1"; }
  output_keys() { jq -r '.payload | fromjson | .key' "$1"; }
else
  field() {
    python3 -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("none" if v is None else v)' "$1" "$2"
  }
  output_keys() {
    python3 -c 'import json, sys
for line in open(sys.argv[1]): print(json.loads(json.loads(line)["payload"])["key"])' "$1"
  }
fi

rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
"$BIN" sample --events "$EVENTS" > "$RUN_DIR/commands.jsonl"
"$BIN" log append --log "$log" "$RUN_DIR/commands.jsonl" | tail -n 1 | sed 's/^/last offset appended: /'

echo; echo "== tribunal cluster: $INSTANCES instances until every record is durable on each"
"$BIN" cluster --instances "$INSTANCES" --log "$log" --data-dir "$RUN_DIR/cluster" --stop-at-end

echo; echo "== tribunal evaluate (the sequential reference over the same log)"
"$BIN" evaluate --log "$log" --json > "$RUN_DIR/reference.json"
reference=$(field "$RUN_DIR/reference.json" state_digest)
input_records=$(field "$RUN_DIR/reference.json" records)
echo "$input_records records, state digest $reference, outputs digest $(field "$RUN_DIR/reference.json" outputs_digest)"

echo; echo "== tribunal inspect (each instance's durable state)"
agree=0
for i in $(seq 1 "$INSTANCES"); do
  "$BIN" inspect --data-dir "$RUN_DIR/cluster/instance-$i" --json > "$RUN_DIR/inspect-$i.json"
  digest=$(field "$RUN_DIR/inspect-$i.json" state_digest)
  outputs_digest=$(field "$RUN_DIR/inspect-$i.json" outputs_digest)
  watermark=$(field "$RUN_DIR/inspect-$i.json" durable_watermark)
  if [[ $digest == "$reference" ]]; then
    verdict="agrees"; agree=$((agree + 1))
  else
    verdict="DIFFERS"
  fi
  echo "instance $i: durable watermark $watermark, state digest $digest ($verdict), outputs digest $outputs_digest"
done
if ((agree != INSTANCES)); then
  echo "$((INSTANCES - agree)) of $INSTANCES instances disagree with the reference"
  exit 1
fi
echo "all $INSTANCES instances agree with the reference"

echo; echo "== certified outputs published to $log/outputs"
if [[ ! -d $RUN_DIR/log/outputs ]]; then
  echo "no outputs log at $RUN_DIR/log/outputs: the federation published nothing"
  exit 1
fi
"$BIN" log read --log "$log/outputs" > "$RUN_DIR/outputs.jsonl"
records=$(wc -l < "$RUN_DIR/outputs.jsonl")
# Each line is {"offset", "timestamp_ms", "payload"}; the payload is the output's JSON, keyed
# "partition:offset" by the input record it answers.
keys=$(output_keys "$RUN_DIR/outputs.jsonl" | sort -u | wc -l)
echo "$records records, $keys distinct keys, for $input_records input records"
