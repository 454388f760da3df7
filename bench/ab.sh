#!/usr/bin/env bash
# A/B two broker binaries with alternating runs (this machine is shared and
# noisy: single runs mislead). For each round, each binary gets a fresh
# broker (embedded Postgres) and the same loadgen runs: direct 100 peers
# (window 16) and broadcast 1 × 100 (window 4). Prints one JSON line per run
# and the medians per binary and scenario.
#   bench/ab.sh A_BINARY B_BINARY [ROUNDS] [SECONDS]
# (bench/run.sh with BASELINE=A_BINARY does the same within the full matrix.)
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-3} DURATION=${4:-5}
PORT=${PORT:-7990}
. bench/lib.sh
bench_workdir ab
RAW="$WORK/raw.jsonl"
run() {
  local label=$1 scenario=$2; shift 2
  local json
  json=$(loadgen_json "$scenario" "$@" "${BROKER_ARGS[@]}" --duration "$DURATION")
  python3 -c 'import json,sys; r=json.loads(sys.argv[3]); r.update(bin=sys.argv[1], scenario=sys.argv[2]); print(json.dumps(r))' \
    "$label" "$scenario" "$json" | tee -a "$RAW"
}
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    BROKER=$A; [ "$side" = B ] && BROKER=$B
    start_broker "$side-$round"
    run "$side" direct --peers 100 --payload 256 --window 16
    run "$side" broadcast --meshes 1 --peers 100 --payload 256 --window 4
    stop_broker
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
