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
. bench/lib.sh
BROKER=$TARGET/release/meshbroker
bench_workdir stalled

cargo build --release -p meshbroker -p loadgen >&2

# 10 senders, 1000 broadcasts/s in all, 1 KiB, to 100 members: 90 pushes
# per send reach the readers. A 1 MiB outbound bound cuts the stalled
# reader about a second in (what it misses is then held for its member).
LOAD=(broadcast --meshes 1 --peers 100 --senders 10 --payload 1024 --rate 1000 --duration 8)

run() {
  local stalled=$1 n=$2
  start_broker "run$n" MAX_OUTBOUND_BYTES=1048576
  loadgen_json "${LOAD[@]}" --stalled-readers "$stalled" "${BROKER_ARGS[@]}" >"$WORK/run$n/report.json"
  # The cut: the session is closed 1013 (counted once its socket is gone)
  # and what it can no longer take is held for its member.
  local metrics cut held
  metrics=$(curl -s "http://127.0.0.1:$PORT/metrics")
  cut=$(echo "$metrics" | sed -n 's/^broker_connections_closed_total{reason="slow_reader"} //p')
  held=$(echo "$metrics" | sed -n 's/^broker_queue_depth //p')
  jq -c --arg cut "${cut:-0}" --arg held "${held:-0}" '{stalled: .stalled_readers, sent,
      pushes, lost, duplicates, push_p50: .push_ms.p50, push_p99: .push_ms.p99,
      broker_cpu_pct, slow_reader_closes: ($cut|tonumber), held_after: ($held|tonumber),
      failure}' "$WORK/run$n/report.json" | tee -a "$WORK/all.jsonl"
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
