# Shell shared by bench/run.sh, bench/ab.sh and bench/stalled.sh (sourced,
# never run): a work directory, a fresh broker on a throwaway embedded
# Postgres, one loadgen run to JSON.
#
# The caller sets PORT and BROKER (the broker binary; may change between
# start_broker calls for A/B) before use; LOADGEN and TARGET come from here.

TARGET=${CARGO_TARGET_DIR:-target}
LOADGEN=${LOADGEN:-$TARGET/release/loadgen}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# bench_workdir NAME: $WORK, removed (and the broker stopped) on exit.
# Readable by all: the embedded Postgres may run as another user.
bench_workdir() {
  WORK=$(mktemp -d "/tmp/meshbroker-$1-XXXXXX")
  chmod 755 "$WORK"
  trap 'stop_broker; rm -rf "$WORK"' EXIT
}

# stop_pid PID: TERM, up to 10 s to exit, then KILL.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

BPID=""
DBURL=""
BROKER_ARGS=()
stop_broker() {
  stop_pid "$BPID"
  BPID=""
}

# start_broker NAME [VAR=VALUE...]: a fresh $BROKER (and embedded Postgres)
# on $PORT, its files in $WORK/NAME; sets BPID, DBURL and BROKER_ARGS (what
# a loadgen run against it needs).
start_broker() {
  stop_broker
  local dir="$WORK/$1"
  shift
  mkdir -p "$dir"
  chmod 755 "$dir"
  env -u DATABASE_URL MESHBROKER_DATA_DIR="$dir/data" BROKER_PORT="$PORT" \
    BROKER_HOST=127.0.0.1 CLAUDE_PROJECTS_DIR="$dir/none" NODE_ENV=development \
    SEND_RATE_PER_MIN=4000000000 SEND_BURST=4000000000 "$@" \
    "$BROKER" 2>"$dir/broker.log" &
  BPID=$!
  for _ in $(seq 300); do
    grep -q '"db healthy"' "$dir/broker.log" 2>/dev/null && break
    kill -0 "$BPID" 2>/dev/null || { cat "$dir/broker.log" >&2; exit 1; }
    sleep 0.1
  done
  DBURL=$(grep '"msg":"database"' "$dir/broker.log" | head -1 | sed -E 's/.*"url":"([^"]+)".*/\1/')
  [ -n "$DBURL" ] || { echo "no database url in $dir/broker.log" >&2; exit 1; }
  BROKER_ARGS=(--url "ws://127.0.0.1:$PORT/ws" --database-url "$DBURL" --broker-pid "$BPID")
}

# run_json CMD...: a benchmark client's run; its JSON report on stdout, a
# failure object if it gave none (a failed run still reports).
run_json() {
  local json
  json=$("$@") || echo "   (run reported a failure)" >&2
  [ -n "$json" ] || json='{"failure":"no report"}'
  printf '%s\n' "$json"
}

# loadgen_json LOADGEN-ARGS...: one quiet loadgen run, as run_json.
loadgen_json() {
  run_json "$LOADGEN" "$@" --json --quiet
}
