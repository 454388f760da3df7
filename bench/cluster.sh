#!/usr/bin/env bash
# Several nodes against one (README "Several nodes"), alternating rounds:
#   broadcast 1 x 100, window 4: one node, then the same load with the
#     subscribers (and senders) split over two nodes on one nats-server;
#     broker CPU per push summed over the nodes.
#   direct 2 peers at a moderate open-loop rate: on one node, then with the
#     two peers on different nodes (every send crosses the bus): send→push
#     p50/p99.
# Usage: ROUNDS=3 DURATION=6 RATE=2000 bench/cluster.sh   (JSON in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BROKER=${BROKER:-$TARGET/release/meshbroker}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6}
RATE=${RATE:-2000}
OUT=${OUT:-bench/cluster-results}
NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$NATS_BIN" ] || { echo "nats-server is not installed (apt-get install nats-server)" >&2; exit 1; }
mkdir -p "$OUT"
bench_workdir cluster
PORT=7931
PORT_B=7932
NATS_PORT=7933
NPID=""
B2PID=""
cleanup() { stop_pid "$B2PID"; stop_broker; stop_pid "$NPID"; rm -rf "$WORK"; }
trap cleanup EXIT

# two_nodes: node a (with the embedded Postgres) and node b on its database.
two_nodes() {
  stop_pid "$B2PID"
  stop_pid "$NPID"
  "$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
  NPID=$!
  start_broker two NATS_URL="nats://127.0.0.1:$NATS_PORT" NODE_ID=a
  local dir="$WORK/two-b"
  mkdir -p "$dir"
  env DATABASE_URL="$DBURL" BROKER_PORT="$PORT_B" BROKER_HOST=127.0.0.1 \
    CLAUDE_PROJECTS_DIR="$dir/none" NODE_ENV=development \
    SEND_RATE_PER_MIN=4000000000 SEND_BURST=4000000000 \
    NATS_URL="nats://127.0.0.1:$NATS_PORT" NODE_ID=b "$BROKER" 2>"$dir/broker.log" &
  B2PID=$!
  for _ in $(seq 300); do
    grep -q '"node joined"' "$dir/broker.log" 2>/dev/null && break
    sleep 0.1
  done
  BROKER_ARGS=(--url "ws://127.0.0.1:$PORT/ws" --url "ws://127.0.0.1:$PORT_B/ws"
    --database-url "$DBURL" --broker-pid "$BPID" --broker-pid "$B2PID")
}

one_node() {
  stop_pid "$B2PID"
  B2PID=""
  stop_pid "$NPID"
  NPID=""
  start_broker one
}

for round in $(seq "$ROUNDS"); do
  for shape in one two; do
    if [ "$shape" = one ]; then one_node; else two_nodes; fi
    "$LOADGEN" "${BROKER_ARGS[@]}" --json --quiet \
      broadcast --meshes 1 --peers 100 --payload 256 --duration "$DURATION" --window 4 \
      >"$OUT/broadcast-$shape-$round.json"
    if [ "$shape" = one ]; then one_node; else two_nodes; fi
    "$LOADGEN" "${BROKER_ARGS[@]}" --json --quiet \
      direct --peers 2 --payload 256 --duration "$DURATION" --rate "$RATE" \
      >"$OUT/direct-$shape-$round.json"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(kind, shape):
    return [json.load(open(f"{out}/{kind}-{shape}-{r}.json")) for r in range(1, rounds + 1)]
def med(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else float("nan")
bc = {s: rows("broadcast", s) for s in ("one", "two")}
cpu = {s: med(r["broker_cpu_us_per_push"] for r in bc[s]) for s in bc}
rate = {s: med(r["pushes_per_s"] for r in bc[s]) for s in bc}
ok = all(r["ok"] for s in bc for r in bc[s])
print(f"broadcast 1x100 window 4: one node {cpu['one']:.3f} us/push ({rate['one']/1e6:.2f} M/s), "
      f"two nodes {cpu['two']:.3f} us/push ({rate['two']/1e6:.2f} M/s): {cpu['two']/cpu['one']:.2f}x "
      f"(aim <= 1.5x), all runs ok: {ok}")
for shape in ("one", "two"):
    d = rows("direct", shape)
    p50 = med(r["push_ms"]["p50"] for r in d)
    p99 = med(r["push_ms"]["p99"] for r in d)
    ack99 = med(r["ack_ms"]["p99"] for r in d)
    lag99 = med(r["schedule_lag_ms"]["p99"] for r in d)
    print(f"direct 2 peers {shape} node(s): send->push p50 {p50:.3f} ms p99 {p99:.3f} ms, "
          f"ack p99 {ack99:.3f} ms, schedule lag p99 {lag99:.3f} ms, all ok: {all(r['ok'] for r in d)}")
PY
