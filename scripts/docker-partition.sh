# Partition scenarios on the compose cluster, sourced by scripts/docker-test.sh (which has
# brought the cluster up, healthy, and defines `compose`, `project`, `work` and the ports).
# Under load from loadgen, one instance is cut off the compose network (no peer, no client
# reaches it, and it reaches none) for PARTITION_S seconds, then connected again with its
# address. Checked: the two others go on certifying while it is away; after the heal it
# catches up (its certified watermark reaches what the others had certified at the heal,
# and the time that took is reported); loadgen's invariants hold (nothing lost, nothing
# applied twice, every instance's stock identical).

PARTITION_S=${PARTITION_S:-10}

# The first partition's certified watermark as instance $1 reports it (-1 for none, or
# when it does not answer).
certified() {
    local port_var="TRIBUNAL_PORT_$1"
    curl -s --max-time 2 "http://127.0.0.1:${!port_var}/v1/cluster" | python3 -c '
import json, sys
try:
    w = json.load(sys.stdin)["partitions"][0]["certified_watermark"]
    print(-1 if w is None else w)
except Exception:
    print(-1)'
}

# The instance that says it is the publisher, among those that answer (empty if none).
publisher() {
    local i port_var
    for i in 1 2 3; do
        port_var="TRIBUNAL_PORT_$i"
        if curl -s --max-time 2 "http://127.0.0.1:${!port_var}/v1/cluster" \
            | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["publisher"] is True else 1)' 2> /dev/null; then
            echo "$i"; return
        fi
    done
}

partition() {
    local scenario=$1 loadgen_name="$project-loadgen" network="${project}_tribunal"
    compose run -d --name "$loadgen_name" loadgen > /dev/null
    sleep $((LOADGEN_WARMUP_S + 3))
    local victim=3
    [ "$scenario" = partition-publisher ] && victim=$(publisher)
    [ -n "$victim" ] || { echo "docker-test: no publisher to cut off" >&2; exit 1; }
    local survivor=$((victim % 3 + 1)) container
    container=$(compose ps -q "tribunal-$victim")
    local before after target healed_s
    before=$(certified "$survivor")
    echo "== $scenario: instance $victim cut off for $PARTITION_S s (instance $survivor had certified up to $before)"
    docker network disconnect "$network" "$container"
    sleep "$PARTITION_S"
    after=$(certified "$survivor")
    echo "== $scenario: while it was away instance $survivor certified up to $after; publisher now $(publisher)"
    [ "$after" -gt "$before" ] || { echo "docker-test: certification stopped while instance $victim was cut off" >&2; exit 1; }
    if [ "$scenario" = partition-publisher ] && [ "$(publisher)" = "$victim" ]; then
        echo "docker-test: the cut-off publisher $victim was not replaced" >&2; exit 1
    fi
    docker network connect --ip "172.28.0.1$victim" "$network" "$container"
    target=$(certified "$survivor")
    local healed_at=$SECONDS started_ns
    started_ns=$(date +%s%N)
    until [ "$(certified "$victim")" -ge "$target" ]; do
        [ $((SECONDS - healed_at)) -lt 120 ] || { echo "docker-test: instance $victim did not catch up in 120 s" >&2; exit 1; }
        sleep 0.1
    done
    healed_s=$(python3 -c "print(f'{($(date +%s%N) - $started_ns) / 1e9:.2f}')")
    echo "== $scenario: healed; instance $victim certified up to $target (the others' at the heal) $healed_s s later"
    echo "$scenario,$victim,$before,$after,$target,$healed_s" >> "$work/partition.csv"
    local code
    code=$(docker wait "$loadgen_name")
    docker logs "$loadgen_name" > "$work/loadgen.log" 2>&1
    docker rm -v "$loadgen_name" > /dev/null
    [ "$code" = 0 ] || { tail -40 "$work/loadgen.log" >&2; exit 1; }
}
