#!/usr/bin/env bash
# A stalled reader's cost to the other receivers of a broadcast: the same
# open-loop broadcast with 0 and with 1 member that stops reading after its
# hello (loadgen --stalled-readers), alternating, ROUNDS rounds each, a fresh
# broker (embedded Postgres) per run. Prints one line per run and the
# medians of the others' send→push p50/p99.
#
#   bench/stalled.sh            # 3 rounds each
#   ROUNDS=1 bench/stalled.sh   # a quick look
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-7961}
TARGET=${CARGO_TARGET_DIR:-target}
WORK=$(mktemp -d /tmp/meshbroker-stalled-XXXXXX)
chmod 755 "$WORK"

cargo build --release -p meshbroker -p loadgen >&2
BROKER=$TARGET/release/meshbroker
LOADGEN=$TARGET/release/loadgen
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# 10 senders, 1000 broadcasts/s in all, 1 KiB, to 100 members: 90 pushes
# per send reach the readers. A 1 MiB outbound bound cuts the stalled
# reader about a second in (what it misses is then held for its member).
LOAD=(broadcast --meshes 1 --peers 100 --senders 10 --payload 1024 --rate 1000 --duration 8)

BPID=""
stop_broker() {
  if [ -n "$BPID" ] && kill -0 "$BPID" 2>/dev/null; then
    kill -TERM "$BPID"
    for _ in $(seq 100); do kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BPID" 2>/dev/null || true
  fi
  BPID=""
}
trap 'stop_broker; rm -rf "$WORK"' EXIT

run() {
  local stalled=$1 n=$2
  local dir="$WORK/run$n"
  mkdir -p "$dir"
  chmod 755 "$dir"
  env -u DATABASE_URL MESHBROKER_DATA_DIR="$dir/data" BROKER_PORT="$PORT" \
    BROKER_HOST=127.0.0.1 CLAUDE_PROJECTS_DIR="$dir/none" NODE_ENV=development \
    SEND_RATE_PER_MIN=4000000000 SEND_BURST=4000000000 MAX_OUTBOUND_BYTES=1048576 \
    "$BROKER" 2>"$dir/broker.log" &
  BPID=$!
  for _ in $(seq 300); do
    grep -q '"db healthy"' "$dir/broker.log" 2>/dev/null && break
    kill -0 "$BPID" 2>/dev/null || { cat "$dir/broker.log" >&2; exit 1; }
    sleep 0.1
  done
  local db
  db=$(grep '"msg":"database"' "$dir/broker.log" | head -1 | sed -E 's/.*"url":"([^"]+)".*/\1/')
  "$LOADGEN" "${LOAD[@]}" --stalled-readers "$stalled" --url "ws://127.0.0.1:$PORT/ws" \
    --database-url "$db" --broker-pid "$BPID" --json --quiet >"$dir/report.json" || true
  # The cut: the session is closed 1013 (counted once its socket is gone)
  # and what it can no longer take is held for its member.
  local metrics cut held
  metrics=$(curl -s "http://127.0.0.1:$PORT/metrics")
  cut=$(echo "$metrics" | sed -n 's/^broker_connections_closed_total{reason="slow_reader"} //p')
  held=$(echo "$metrics" | sed -n 's/^broker_queue_depth //p')
  jq -c --arg cut "${cut:-0}" --arg held "${held:-0}" '{stalled: .stalled_readers, sent,
      pushes, lost, duplicates, push_p50: .push_ms.p50, push_p99: .push_ms.p99,
      broker_cpu_pct, slow_reader_closes: ($cut|tonumber), held_after: ($held|tonumber),
      failure}' "$dir/report.json" | tee -a "$WORK/all.jsonl"
  stop_broker
}

n=0
for _ in $(seq "$ROUNDS"); do
  for stalled in 0 1; do
    n=$((n + 1))
    run "$stalled" "$n"
  done
done
echo "medians (ms):"
jq -s -c 'group_by(.stalled)[] | {stalled: .[0].stalled,
    push_p50: (map(.push_p50) | sort | .[length/2|floor]),
    push_p99: (map(.push_p99) | sort | .[length/2|floor])}' "$WORK/all.jsonl"
