#!/usr/bin/env bash
# A/B two broker binaries with alternating runs (this machine is shared and
# noisy: single runs mislead). For each round, each binary gets a fresh
# broker (embedded Postgres) and the same loadgen runs: direct 100 peers
# (window 16) and broadcast 1 × 100 (window 4). Prints one JSON line per run
# and the medians per binary and scenario.
#   bench/ab.sh A_BINARY B_BINARY [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-3} DURATION=${4:-5}
LOADGEN=${LOADGEN:-target/release/loadgen}
PORT=${PORT:-7990}
WORK=$(mktemp -d /tmp/meshbroker-ab-XXXXXX)
chmod 755 "$WORK"
RAW="$WORK/raw.jsonl"
BPID=
stop() { [ -n "$BPID" ] && kill "$BPID" 2>/dev/null && wait "$BPID" 2>/dev/null; BPID=; }
trap 'stop; rm -rf "$WORK"' EXIT
start() {
  local bin=$1 dir="$WORK/run-$RANDOM"
  mkdir -p "$dir"; chmod 755 "$dir"
  env -u DATABASE_URL MESHBROKER_DATA_DIR="$dir/data" BROKER_PORT="$PORT" BROKER_HOST=127.0.0.1 \
    CLAUDE_PROJECTS_DIR="$dir/none" SEND_RATE_PER_MIN=4000000000 SEND_BURST=4000000000 \
    "$bin" 2>"$dir/broker.log" &
  BPID=$!
  for _ in $(seq 300); do
    grep -q '"db healthy"' "$dir/broker.log" 2>/dev/null && break
    sleep 0.1
  done
  DBURL=$(grep '"msg":"database"' "$dir/broker.log" | head -1 | sed -E 's/.*"url":"([^"]+)".*/\1/')
}
run() {
  local label=$1 scenario=$2; shift 2
  local json
  json=$("$LOADGEN" "$scenario" "$@" --url "ws://127.0.0.1:$PORT/ws" --database-url "$DBURL" \
    --broker-pid "$BPID" --duration "$DURATION" --json --quiet) || true
  python3 -c 'import json,sys; r=json.loads(sys.argv[3] or "{}"); r.update(bin=sys.argv[1], scenario=sys.argv[2]); print(json.dumps(r))' \
    "$label" "$scenario" "$json" | tee -a "$RAW"
}
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=$A; [ "$side" = B ] && bin=$B
    start "$bin"
    run "$side" direct --peers 100 --payload 256 --window 16
    run "$side" broadcast --meshes 1 --peers 100 --payload 256 --window 4
    stop
  done
done
python3 - "$RAW" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for scenario, rate, cost in [("direct", "sends_per_s", "broker_cpu_us_per_send"),
                             ("broadcast", "pushes_per_s", "broker_cpu_us_per_push")]:
    for side in "AB":
        rs = [r for r in rows if r.get("bin") == side and r.get("scenario") == scenario and r.get(rate)]
        if rs:
            print(f"{scenario:9} {side}: median {statistics.median(r[rate] for r in rs):,.0f} {rate}, "
                  f"{statistics.median(r[cost] for r in rs):.3f} {cost} over {len(rs)} runs")
PY
