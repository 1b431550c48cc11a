#!/usr/bin/env bash
# A tansu Kafka broker for development and benchmarks, the way the tests start one:
# sqlite storage in DIR, a free loopback port, stopped by PID.
#   scripts/kafka-broker.sh start DIR   # prints the port; writes DIR/broker.{pid,port,log}
#   scripts/kafka-broker.sh stop DIR
set -euo pipefail
command=${1:?usage: kafka-broker.sh start|stop DIR}
dir=${2:?usage: kafka-broker.sh start|stop DIR}
export PATH="$HOME/.cargo/bin:$PATH"

case "$command" in
start)
    command -v tansu >/dev/null || { echo "tansu is not installed: run 'make tools'" >&2; exit 1; }
    mkdir -p "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url="tcp://127.0.0.1:$port"
    # tansu resolves the sqlite path against its working directory.
    (cd "$dir" && exec nohup tansu broker --listener-url "$url" --advertised-listener-url "$url" \
        --storage-engine sqlite://tansu.db >broker.log 2>&1) &
    echo $! >"$dir/broker.pid"
    echo "$port" >"$dir/broker.port"
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            exit 0
        fi
        kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || { cat "$dir/broker.log" >&2; exit 1; }
        sleep 0.05
    done
    echo "the broker did not listen on $port; see $dir/broker.log" >&2
    exit 1
    ;;
stop)
    if [[ -f "$dir/broker.pid" ]]; then
        pid=$(cat "$dir/broker.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/broker.pid"
    fi
    ;;
*)
    echo "usage: kafka-broker.sh start|stop DIR" >&2
    exit 2
    ;;
esac
