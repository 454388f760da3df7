#!/usr/bin/env bash
# The standard benchmark matrix (issue 4): builds release, starts a broker
# with a throwaway embedded Postgres for each group of runs, drives it with
# the bundled loadgen and writes bench/RESULTS.md (commands, machine, date,
# figures, which side ran out of CPU).
#
#   bench/run.sh                 # full matrix
#   QUICK=1 bench/run.sh         # short runs (smoke test of the script)
#   DURATION=20 bench/run.sh     # seconds per run (default 10; QUICK: 2)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-bench/RESULTS.md}
DURATION=${DURATION:-10}
[ -n "${QUICK:-}" ] && DURATION=2
PORT=${PORT:-7960}
WORK=$(mktemp -d /tmp/meshbroker-bench-XXXXXX)
chmod 755 "$WORK"
RAW="$WORK/results.jsonl"
: >"$RAW"

cargo build --release -p meshbroker -p loadgen >&2
BROKER=target/release/meshbroker
LOADGEN=target/release/loadgen

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FDS=$(ulimit -n)

BPID=""
DBURL=""
stop_broker() {
  if [ -n "$BPID" ] && kill -0 "$BPID" 2>/dev/null; then
    kill -TERM "$BPID"
    for _ in $(seq 100); do kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BPID" 2>/dev/null || true
  fi
  BPID=""
}
trap 'stop_broker; rm -rf "$WORK"' EXIT

# start_broker NAME [VAR=VALUE...]: a fresh broker (and embedded Postgres).
start_broker() {
  stop_broker
  local name=$1
  shift
  local dir="$WORK/$name"
  mkdir -p "$dir"
  chmod 755 "$dir"
  env -u DATABASE_URL MESHBROKER_DATA_DIR="$dir/data" BROKER_PORT="$PORT" \
    BROKER_HOST=127.0.0.1 CLAUDE_PROJECTS_DIR="$dir/none" NODE_ENV=development \
    SEND_RATE_PER_MIN=4000000000 SEND_BURST=4000000000 "$@" \
    "$BROKER" 2>"$dir/broker.log" &
  BPID=$!
  for _ in $(seq 300); do
    if grep -q '"db healthy"' "$dir/broker.log" 2>/dev/null; then break; fi
    kill -0 "$BPID" 2>/dev/null || { cat "$dir/broker.log" >&2; exit 1; }
    sleep 0.1
  done
  DBURL=$(grep '"msg":"database"' "$dir/broker.log" | head -1 | sed -E 's/.*"url":"([^"]+)".*/\1/')
  [ -n "$DBURL" ] || { echo "no database url in $dir/broker.log" >&2; exit 1; }
}

# bench LABEL AIM loadgen-args...: one run, its JSON appended to $RAW.
bench() {
  local label=$1 aim=$2
  shift 2
  local cmd=("$LOADGEN" "$@" --url "ws://127.0.0.1:$PORT/ws" --database-url "$DBURL" --broker-pid "$BPID" --json --quiet)
  echo ">> $label: ${cmd[*]}" >&2
  local json
  if json=$("${cmd[@]}"); then :; else echo "   (run reported a failure)" >&2; fi
  [ -n "$json" ] || json='{"failure":"loadgen produced no report"}'
  python3 - "$label" "$aim" "$*" "$json" >>"$RAW" <<'EOF'
import json, sys
label, aim, args, report = sys.argv[1:5]
r = json.loads(report)
r.update(label=label, aim=aim, args="loadgen " + args)
print(json.dumps(r))
EOF
  sleep 1
}

# The matrix.
start_broker main
bench "direct 100 peers 256 B, max rate (window 16)" "≥ 300,000 sends/s; ≤ 3 µs broker CPU/send" \
  direct --peers 100 --payload 256 --duration "$DURATION" --window 16
MAX=$(tail -1 "$RAW" | python3 -c 'import json,sys; print(int(json.load(sys.stdin).get("sends_per_s") or 0))')
HALF=$((MAX / 2))
[ "$HALF" -gt 0 ] || HALF=1000
bench "direct 100 peers 256 B at half of max ($HALF/s, open loop)" "p99 send→push < 1 ms" \
  direct --peers 100 --payload 256 --duration "$DURATION" --rate "$HALF"
bench "broadcast 1 × 100 peers 256 B (window 4)" "≥ 5,000,000 pushes/s; ≤ 0.2 µs broker CPU/push" \
  broadcast --meshes 1 --peers 100 --payload 256 --duration "$DURATION" --window 4
# Acknowledged delivery (§11): every push leased and acked, one client_ack
# per read; compare with the two plain rows above.
bench "direct 100 peers 256 B, --client-ack (window 16)" "every push acked; 0 redeliveries; broker µs/send vs. plain direct" \
  direct --peers 100 --payload 256 --duration "$DURATION" --window 16 --client-ack
bench "broadcast 1 × 100 peers 256 B, --client-ack (window 4)" "every push acked; 0 redeliveries; broker µs/push vs. plain broadcast" \
  broadcast --meshes 1 --peers 100 --payload 256 --duration "$DURATION" --window 4 --client-ack
bench "churn 4 × 50 slots" "≥ 20,000 hellos/s" \
  churn --meshes 4 --peers 50 --duration "$DURATION"
# Status-gated delivery (§5): a short run; its point is correctness.
GATED_DURATION=5
[ -n "${QUICK:-}" ] && GATED_DURATION=2
bench "gated 100 peers (50 working), mix 1:1:1 (window 16)" "0 gating/order violations; held drained after idle" \
  gated --peers 100 --payload 256 --duration "$GATED_DURATION" --window 16
# Held envelopes (§4): 50 senders load 50 offline members, who then connect
# and drain; exactly-once by messageId. The closed-loop run ends when an
# offline member has --max-held-per-peer (8000) sends held for it.
HELD_DURATION=5
[ -n "${QUICK:-}" ] && HELD_DURATION=2
bench "held 100 peers (50 offline) 256 B, max rate (window 16)" "≥ 100,000 held sends/s; 0 missing/duplicate" \
  held --peers 100 --payload 256 --duration "$HELD_DURATION" --window 16
bench "held 100 peers (50 offline) 256 B at 50,000/s (open loop)" "p99 ack < 10 ms" \
  held --peers 100 --payload 256 --duration "$HELD_DURATION" --rate 50000

# Bigger meshes need a higher per-mesh cap; connections are bounded by fds.
start_broker scale MAX_CONNECTIONS_PER_MESH=20000
for n in 10 100 1000 10000; do
  if [ $((n + 200)) -gt "$FDS" ]; then
    echo "skip broadcast $n peers: needs more than $FDS fds" >&2
    continue
  fi
  w=4
  [ "$n" -ge 1000 ] && w=1
  aim="cost per push flat"
  [ "$n" = 1000 ] && aim="≥ 4,000,000 pushes/s; cost per push flat"
  bench "broadcast 1 × $n peers 256 B (window $w)" "$aim" \
    broadcast --meshes 1 --peers "$n" --payload 256 --duration "$DURATION" --window "$w" --senders "$((n < 100 ? n : 100))"
done

# The peer directory (§9) and groups (§10): 4 listers issue list_peers at
# 100/s in all and every answer must list all 1000 sessions; every 4th
# member joins load/g. Alone, then under open-loop broadcast (50 × 999
# pushes/s) plus 200 group sends/s to @load, then under closed-loop
# broadcast (window 1).
bench "peers 1000 sessions, list_peers 100/s, no other load" "p99 list_peers < 10 ms; 0 wrong counts" \
  peers --peers 1000 --listers 4 --list-rate 100 --senders 0 --group-rate 0 --duration "$DURATION"
bench "peers 1000 sessions, list_peers 100/s + broadcast 50/s + group 200/s" "p99 list_peers < 20 ms; 0 wrong counts" \
  peers --peers 1000 --listers 4 --list-rate 100 --senders 1 --rate 50 --group-rate 200 --duration "$DURATION"
bench "peers 1000 sessions, list_peers 100/s + closed-loop broadcast (window 1) + group 200/s" "0 wrong counts; list_peers latency reported" \
  peers --peers 1000 --listers 4 --list-rate 100 --senders 1 --window 1 --group-rate 200 --duration "$DURATION"

# Idle: a fresh broker so that RSS growth is the connections' alone.
IDLE=100000
if [ $((IDLE + 500)) -gt "$FDS" ]; then IDLE=$(((FDS - 500) / 1000 * 1000)); fi
[ -n "${QUICK:-}" ] && IDLE=2000
start_broker idle MAX_CONNECTIONS_PER_MESH=1000
bench "idle $IDLE connections" "≤ 2 KiB broker RSS per connection (aim at 100,000)" \
  idle --meshes "$((IDLE / 1000))" --peers 1000 --duration "$DURATION"
stop_broker

# RESULTS.md
python3 - "$RAW" "$OUT" "$FDS" <<'EOF'
import json, sys, os, platform, subprocess, datetime
raw, out, fds = sys.argv[1:4]
rows = [json.loads(l) for l in open(raw) if l.strip()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
def f(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"
def pct(p, k):
    return "-" if not p or not p.get("count") else f"{p[k]:.3f}"
lines = [
    "# meshbroker benchmark results",
    "",
    f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    f"- commit: {sha}",
    f"- machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}, open-files limit {fds}",
    "- broker and loadgen on the same machine, embedded Postgres; produced by `bench/run.sh`",
    "",
    "| run | aim | sends/s | pushes/s | p99 ack ms | p99 push ms | broker µs/send | broker µs/push | broker CPU % | loadgen CPU % | other | lost | ok |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    other = ""
    if r.get("run_hellos"):
        other = f"{f(r.get('hellos_per_s'))} hellos/s, {f(r.get('broker_cpu_us_per_hello'), 1)} µs/hello"
    if r.get("broker_rss_per_conn_bytes") is not None:
        other = f"{f(r['broker_rss_per_conn_bytes'])} B RSS/conn"
    g = r.get("gated")
    if g:
        drain = "-" if g.get("drain_s") is None else f"{g['drain_s'] * 1000:,.0f} ms"
        other = (f"{g['held_pushes']:,}/{g['held_expected']:,} held, drain {drain}, "
                 f"violations: {g['gating_violations']} gating, {g['held_order_violations']} order, "
                 f"{g['held_creation_order_violations']} cross-sender order")
    h = r.get("held")
    if h:
        drain = "-" if h.get("drain_s") is None else f"{h['drain_s'] * 1000:,.0f} ms"
        ack = r.get("ack_ms") or {}
        other = (f"ack p50 {pct(ack, 'p50')} / p99 {pct(ack, 'p99')} ms; "
                 f"{h['held_pushes']:,}/{h['held_expected']:,} held, drain {drain} "
                 f"({f(h.get('drain_pushes_per_s'))} pushes/s); exactly once: {h['missing']} missing, "
                 f"{h['duplicates']} dup; {h['unavailable']} unavailable, {h['non_durable_acks']} durable:false")
    a = r.get("acks")
    if a and a.get("client_ack"):
        other = (f"{a['client_acked_ids']:,} ids in {a['client_acks']:,} client_acks "
                 f"({f(a.get('ids_per_client_ack'), 1)}/ack); {a['redeliveries']:,} redelivered "
                 f"({a['redelivered_unacked']:,} of unacked, {a['redelivered_after_ack']:,} after ack); "
                 f"rss {f((r.get('broker_rss_bytes') or 0) / 1048576, 1)} MiB")
    d = r.get("directory")
    if d:
        lu, gp = d.get("list_us") or {}, d.get("group_push_ms") or {}
        group = ""
        if d.get("group_sent"):
            group = (f"; group {f(d.get('group_pushes_per_s'))} pushes/s, "
                     f"p50/p99 {pct(gp, 'p50')}/{pct(gp, 'p99')} ms")
        other = (f"list_peers {d['lists_answered']:,}/{d['lists_sent']:,} answered, "
                 f"p50/p99/max {f(lu.get('p50'))}/{f(lu.get('p99'))}/{f(lu.get('max'))} µs, "
                 f"{f(d.get('mean_entries'))} entries, {f(d.get('mean_answer_bytes'))} B; "
                 f"wrong counts {d['list_mismatches']}, errors {d['list_errors']}{group}")
    lines.append("| " + " | ".join([
        r["label"], r["aim"], f(r.get("sends_per_s")), f(r.get("pushes_per_s")),
        pct(r.get("ack_ms"), "p99"), pct(r.get("push_ms"), "p99"),
        f(r.get("broker_cpu_us_per_send"), 2), f(r.get("broker_cpu_us_per_push"), 3),
        f(r.get("broker_cpu_pct")), f(r.get("loadgen_cpu_pct")), other,
        str(r.get("lost", "-")), "yes" if r.get("ok") else "NO: " + str(r.get("failure") or ""),
    ]) + " |")
lines += ["", "CPU % is of one core (200 % = both cores). Which side ran out of CPU: compare the broker's and loadgen's columns with 200 %.", "", "## Commands", ""]
for r in rows:
    lines.append(f"- {r['label']}: `{r['args']} --url ws://127.0.0.1:PORT/ws --database-url … --json`")
lines += ["", "## Raw reports", "", "```"] + [json.dumps(r) for r in rows] + ["```"]
# The matrix replaces what the last run wrote; hand-written notes outside
# the markers (the optimization log) are kept.
begin, end = "<!-- matrix:begin -->", "<!-- matrix:end -->"
block = "\n".join([begin] + lines + [end])
old = open(out).read() if os.path.exists(out) else ""
if begin in old and end in old:
    text = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
else:
    text = block + "\n"
open(out, "w").write(text)
print(f"wrote {out}", file=sys.stderr)
EOF
