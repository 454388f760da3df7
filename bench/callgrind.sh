#!/usr/bin/env bash
# Instructions per send and per push, from valgrind's callgrind: stable on
# this shared, noisy machine where wall-clock A/B runs are not. For each
# broker binary given, for direct (100 peers) and broadcast (1 × 100), the
# broker runs under callgrind (epoll driver: valgrind has no io_uring; 2
# shards; embedded Postgres) twice, with N and 5 N units; the difference
# divided by 4 N cancels start-up, migrations and shutdown.
#   bench/callgrind.sh [-n N] BINARY...
# Prints one line per binary and scenario: instructions per unit.
set -euo pipefail
cd "$(dirname "$0")/.."
N=5000
if [ "${1:-}" = "-n" ]; then N=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: bench/callgrind.sh [-n N] BINARY..." >&2; exit 2; }
LOADGEN=${LOADGEN:-target/release/loadgen}
[ -x "$LOADGEN" ] || { echo "no $LOADGEN: cargo build --release -p loadgen" >&2; exit 2; }
PORT=${PORT:-7991}
WORK=$(mktemp -d /tmp/meshbroker-callgrind-XXXXXX)
chmod 755 "$WORK"
BPID=
stop() {
  if [ -n "$BPID" ]; then kill -TERM "$BPID" 2>/dev/null || true; wait "$BPID" 2>/dev/null || true; fi
  BPID=
}
trap 'stop; rm -rf "$WORK"' EXIT

# Total instructions of one broker run that carries `units` of `scenario`.
instructions() {
  local bin=$1 scenario=$2 units=$3 dir
  dir=$(mktemp -d "$WORK/run-XXXX"); chmod 755 "$dir"
  env -u DATABASE_URL MESHBROKER_DATA_DIR="$dir/data" BROKER_PORT="$PORT" BROKER_HOST=127.0.0.1 \
    BROKER_SHARDS=2 BROKER_IO_DRIVER=epoll CLAUDE_PROJECTS_DIR="$dir/none" \
    SEND_RATE_PER_MIN=4000000000 SEND_BURST=4000000000 HELLO_TIMEOUT_SECONDS=600 \
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" 2>"$dir/broker.log" &
  BPID=$!
  for _ in $(seq 1200); do
    grep -q '"db healthy"' "$dir/broker.log" 2>/dev/null && break
    sleep 0.1
  done
  local db
  db=$(grep '"msg":"database"' "$dir/broker.log" | head -1 | sed -E 's/.*"url":"([^"]+)".*/\1/')
  case $scenario in
    direct) "$LOADGEN" direct --peers 100 --window 16 --count "$units" --duration 600 \
              --url "ws://127.0.0.1:$PORT/ws" --database-url "$db" --quiet >/dev/null ;;
    # A broadcast to 100 peers is 99 pushes: units are broadcasts here.
    broadcast) "$LOADGEN" broadcast --meshes 1 --peers 100 --senders 1 --window 4 --count "$units" \
              --duration 600 --url "ws://127.0.0.1:$PORT/ws" --database-url "$db" --quiet >/dev/null ;;
  esac
  stop
  # A run that carried nothing is no measurement.
  [ "$(grep -c '"ws hello"' "$dir/broker.log")" -ge 100 ] || { echo "$scenario run failed: $dir" >&2; exit 1; }
  grep -E '^summary:' "$dir/cg.out" | awk '{print $2}'
}

for bin in "$@"; do
  for scenario in direct broadcast; do
    units=$N; per=send
    if [ "$scenario" = broadcast ]; then units=$((N / 10)); per=push; fi
    small=$(instructions "$bin" "$scenario" "$units")
    large=$(instructions "$bin" "$scenario" $((5 * units)))
    python3 -c 'import sys
small, large, units, fanout = map(int, sys.argv[1:5])
print(f"{sys.argv[5]}  {sys.argv[6]:9}  {(large - small) / (4 * units * fanout):10.0f} instructions per {sys.argv[7]}")' \
      "$small" "$large" "$units" "$([ "$scenario" = broadcast ] && echo 99 || echo 1)" "$bin" "$scenario" "$per"
  done
done
