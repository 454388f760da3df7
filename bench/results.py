#!/usr/bin/env python3
"""bench/run.sh's report: from the runs' tagged JSON lines, the issue-14
aims table (medians, measured/aim, met?), the percentile distributions and
SVG plots beside OUT (gnuplot), and the full matrix; written into OUT
between markers, everything else in OUT (the optimization log) kept.

    results.py RAW OUT FDS ROUNDS DURATION PLOTWORK
    env: BASELINE, FLOOR_SKIP, NATS_SKIP, IDLE_NOTE (all may be empty)
"""
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

raw, out, fds, rounds, duration, plot_work = sys.argv[1:7]
rounds = int(rounds)
rows = [json.loads(line) for line in open(raw) if line.strip()]
results_dir = os.path.dirname(out) or "."
baseline = os.environ.get("BASELINE", "")
floor_skip = os.environ.get("FLOOR_SKIP", "")
nats_skip = os.environ.get("NATS_SKIP", "")
idle_note = os.environ.get("IDLE_NOTE", "")
TITLE = "# meshbroker benchmark results"


def get(r, path):
    v = r
    for k in path.split("."):
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def runs(key, side="current"):
    return [r for r in rows if r.get("key") == key and r.get("side") == side]


def median(key, metric, side="current"):
    """(median, runs it is of) of a field path or a function of a run."""
    pick = metric if callable(metric) else (lambda r: get(r, metric))
    vals = [v for v in map(pick, runs(key, side)) if v is not None]
    return (statistics.median(vals) if vals else None), len(vals)


def median_run(key, side="current"):
    """The run whose send→push p99 is the median: whose distribution to plot."""
    rs = sorted((r for r in runs(key, side) if get(r, "push_ms.count")), key=lambda r: get(r, "push_ms.p99"))
    return rs[(len(rs) - 1) // 2] if rs else None


def f(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"


def command(key, side="current"):
    rs = runs(key, side)
    return f"`{rs[0]['args']}`" if rs else "-"


def failed(key, side="current"):
    n = sum(1 for r in runs(key, side) if not r.get("ok"))
    return f"; {n} of {len(runs(key, side))} runs failed (see the matrix)" if n else ""


aims = []


def aim(scenario, goal, measured, value, target, better, cmd, base=None):
    """A row; `better` is "le", "lt" or "ge"; `base` the baseline's value."""
    if value is None or target is None:
        ratio, met = "-", "?"
    else:
        ratio = f"{value / target:.2f}"
        met = {"le": value <= target, "lt": value < target, "ge": value >= target}[better]
        met = "yes" if met else "no"
    row = dict(scenario=scenario, aim=goal, measured=measured, ratio=ratio, met=met, command=cmd)
    if baseline:
        row["baseline"] = "-" if base is None else base[1]
        row["change"] = "-" if base is None or not base[0] or value is None else f"{(value - base[0]) * 100 / base[0]:+.1f} %"
    aims.append(row)


def ab(key, metric, fmt):
    """The baseline's median of a metric, as (value, text), for A/B rows."""
    if not baseline:
        return None
    v, n = median(key, metric, "baseline")
    return None if v is None else (v, fmt(v) + (f" ({n})" if n != rounds else ""))


def of_n(n):
    return "" if n == rounds else f" ({n} run{'s' if n != 1 else ''})"


# Broadcast 1 × 100 and its references.
us, n_us = median("bcast", "broker_cpu_us_per_push")
floor_us, _ = median("bcast", "broker_cpu_us_per_push", "floor")
bcmd = command("bcast")
if us is not None and floor_us:
    ratio = us / floor_us
    base = ab("bcast", "broker_cpu_us_per_push", lambda v: f"{v / floor_us:.2f}× ({v:.3f} µs/push)")
    aim("broadcast 1 × 100, 256 B: broker CPU per push against the bare fan-out loop (floor)",
        "≤ 2× the floor's µs/push",
        f"{ratio:.2f}× (broker {us:.3f}, floor {floor_us:.3f} µs/push){of_n(n_us)}{failed('bcast')}",
        ratio, 2.0, "le", bcmd, base and (base[0] / floor_us, base[1]))
else:
    why = floor_skip or "no floor run reported its cost"
    aim("broadcast 1 × 100, 256 B: broker CPU per push against the bare fan-out loop (floor)",
        "≤ 2× the floor's µs/push", f"broker {f(us, 3)} µs/push; skipped: {why}", None, None, "le", bcmd,
        ab("bcast", "broker_cpu_us_per_push", lambda v: f"{v:.3f} µs/push"))
pushes, n = median("bcast", "pushes_per_s")
aim("broadcast 1 × 100, 256 B: pushes/s", "≥ 5,000,000", f"{f(pushes)}{of_n(n)}{failed('bcast')}",
    pushes, 5e6, "ge", bcmd, ab("bcast", "pushes_per_s", f))
cpu, n = median("bcast", "loadgen_cpu_pct")
threads, _ = median("bcast", "threads")
threads = int(threads or os.cpu_count())
aim("broadcast 1 × 100, 256 B: loadgen CPU (it must not be what limits)",
    f"< 80 % of its cores ({80 * threads} % of {100 * threads} %)",
    f"{f(cpu)} % of {100 * threads} % ({threads} loadgen threads; 100 % = one core){of_n(n)}",
    cpu, 80.0 * threads, "lt", bcmd, ab("bcast", "loadgen_cpu_pct", lambda v: f"{v:.0f} %"))
for side, name, skip in [("floor", "bare fan-out loop (bench/floor)", floor_skip),
                         ("nats", "nats-server via bench/natsref, 100 subscribers", nats_skip)]:
    p, n = median("bcast", "pushes_per_s", side)
    u, _ = median("bcast", "broker_cpu_us_per_push", side)
    c, _ = median("bcast", "loadgen_cpu_pct", side)
    if n:
        text = f"{f(p)} pushes/s, {f(u, 3)} µs/push, client {f(c)} % CPU{of_n(n)}{failed('bcast', side)}"
    else:
        text = f"skipped: {skip or 'no run reported'}"
    aims.append(dict(scenario=f"reference, broadcast 1 × 100, 256 B: {name}", aim="(reference)", measured=text,
                     ratio="-", met="-", command=command("bcast", side), baseline="-", change="-"))

# Cost per push over mesh sizes.
sweep = {}
for n_peers in (10, 100, 1000, 10000):
    v, n = median(f"sweep-{n_peers}", "broker_cpu_us_per_push")
    if v:
        sweep[n_peers] = (v, n)
if len(sweep) >= 2:
    lo, hi = min(v for v, _ in sweep.values()), max(v for v, _ in sweep.values())
    points = ", ".join(f"{k:,}: {v:.3f}" for k, (v, _) in sweep.items())
    missing = [k for k in (10, 100, 1000, 10000) if k not in sweep]
    note = f"; no run at {', '.join(f'{k:,}' for k in missing)}" if missing else ""
    aim("broadcast 10 → 100 → 1,000 → 10,000 peers per mesh: cost per push", "max/min ≤ 1.5×",
        f"{hi / lo:.2f}× ({points} µs/push){note}", hi / lo, 1.5, "le", command("sweep-1000"))
else:
    aim("broadcast 10 → 100 → 1,000 → 10,000 peers per mesh: cost per push", "max/min ≤ 1.5×",
        "fewer than two mesh sizes ran", None, None, "le", "-")

# Direct.
dcmd = command("direct-max")
v, n = median("direct-max", "broker_cpu_us_per_send")
aim("direct 100 peers, 256 B, max rate: broker CPU per send", "≤ 2.5 µs",
    f"{f(v, 2)} µs{of_n(n)}{failed('direct-max')}", v, 2.5, "le", dcmd,
    ab("direct-max", "broker_cpu_us_per_send", lambda x: f"{x:.2f} µs"))
v, n = median("direct-max", "sends_per_s")
aim("direct 100 peers, 256 B, max rate: sends/s", "≥ 350,000", f"{f(v)}{of_n(n)}{failed('direct-max')}",
    v, 350_000, "ge", dcmd, ab("direct-max", "sends_per_s", f))


def schedule(key):
    """The open loop's proof: in how many runs it kept its schedule."""
    rs = runs(key)
    kept = sum(1 for r in rs if r.get("kept_schedule") is True)
    lag, _ = median(key, "schedule_lag_ms.p99")
    tick = next((r.get("tick_us") for r in rs if r.get("tick_us")), None)
    text = f"schedule kept in {kept} of {len(rs)} runs (p99 lag {f(lag, 3)} ms, tick {f(tick)} µs)"
    return bool(rs) and kept == len(rs), text


def open_loop(key, scenario, goal, metric, target):
    v, n = median(key, metric)
    kept, text = schedule(key)
    aim(scenario, goal, f"{f(v, 3)} ms; {text}{of_n(n)}{failed(key)}", v, target, "lt", command(key))
    if aims[-1]["met"] == "yes" and not kept:
        aims[-1]["met"] = "no: the loadgen fell behind its schedule"


rate, _ = median("direct-half", "rate")
open_loop("direct-half", f"direct 100 peers, 256 B at half of max ({f(rate)}/s), open loop: p99 send→push",
          "< 1 ms, the schedule kept", "push_ms.p99", 1.0)

# Idle, churn, held.
v, n = median("idle", "broker_rss_per_conn_bytes")
conns, _ = median("idle", "connections")
aim(f"idle: broker RSS per connection at {f(conns)} connections" + (f" ({idle_note})" if idle_note else ""),
    "≤ 2 KiB (2,048 B) at 19,000", f"{f(v)} B{of_n(n)}{failed('idle')}", v, 2048, "le", command("idle"))
v, n = median("churn", "hellos_per_s")
aim("churn: signed hellos/s", "≥ 20,000", f"{f(v)}{of_n(n)}{failed('churn')}", v, 20_000, "ge", command("churn"))


def committed_per_s(r):
    h, acked, active = r.get("held") or {}, get(r, "acked"), get(r, "active_s")
    if acked is None or not active:
        return None
    return (acked - (h.get("non_durable_acks") or 0)) / active


v, n = median("held-max", committed_per_s)
aim("held sends (durable), max rate: committed rows/s (durable acks)", "≥ 100,000",
    f"{f(v)}{of_n(n)}{failed('held-max')}", v, 100_000, "ge", command("held-max"))
open_loop("held-half", "held sends (durable) at 50,000/s, open loop: p99 ack", "< 10 ms, the schedule kept",
          "ack_ms.p99", 10.0)

# Percentile distributions and plots.
os.makedirs(plot_work, exist_ok=True)
hgrm_dir = os.path.join(results_dir, "hgrm")
os.makedirs(hgrm_dir, exist_ok=True)
lines = []
for key, side, name, title in [("direct-max", "current", "direct-max", "direct, max rate (window 16)"),
                               ("direct-half", "current", "direct-half", "direct, half of max, open loop"),
                               ("bcast", "current", "broadcast", "broadcast 1 × 100, broker"),
                               ("bcast", "floor", "broadcast-floor", "broadcast 1 × 100, floor"),
                               ("bcast", "nats", "broadcast-nats", "broadcast 1 × 100, nats-server")]:
    r = median_run(key, side)
    src = r and r["hgrm_prefix"] + "-push.hgrm"
    if src and os.path.exists(src):
        dst = os.path.join(hgrm_dir, f"{name}-push.hgrm")
        shutil.copyfile(src, dst)
        lines.append((dst, title))

with open(os.path.join(plot_work, "cost.dat"), "w") as d:
    for k in sorted(sweep):
        vals = [get(r, "broker_cpu_us_per_push") for r in runs(f"sweep-{k}")]
        vals = [x for x in vals if x is not None]
        d.write(f"{k} {sweep[k][0]} {min(vals)} {max(vals)}\n")
with open(os.path.join(plot_work, "throughput.dat"), "w") as d:
    for side, label in [("current", "broker"), ("baseline", "baseline"), ("floor", "floor"), ("nats", "nats-server")]:
        p, n = median("bcast", "pushes_per_s", side)
        u, _ = median("bcast", "broker_cpu_us_per_push", side)
        if n:
            d.write(f'"{label}" {p / 1e6} {u if u is not None else "NaN"}\n')

svg = 'set terminal svg size 900,520 dynamic enhanced font "sans,12" background rgb "white"\n'
plots = {
    "plot-cost-per-push.svg": svg + f"""
set output '{plot_work}/plot-cost-per-push.svg'
set title 'Broadcast: broker CPU per push against peers per mesh (256 B; median of {rounds}, bars min–max)'
set logscale x
set xrange [5:20000]
set xtics ('10' 10, '100' 100, '1,000' 1000, '10,000' 10000)
set xlabel 'peers per mesh'
set ylabel 'broker CPU per push, µs'
set yrange [0:*]
set key top left
set grid
plot '{plot_work}/cost.dat' using 1:2:3:4 with yerrorlines lw 2 pt 7 title 'broker'"""
    + (f", '{plot_work}/floor.dat' using 1:2 with points pt 9 ps 2 title 'bare fan-out loop (floor), 100 peers'"
       if floor_us else "")
    + (f", {min(v for v, _ in sweep.values()) * 1.5} with lines dt 2 lc 'gray' title 'aim: 1.5 × the lowest'"
       if sweep else "") + "\n",
    "plot-throughput.svg": svg + f"""
set output '{plot_work}/plot-throughput.svg'
set multiplot layout 1,2 title 'Broadcast 1 × 100, 256 B, window 4: the broker against its references (median of {rounds})'
set style fill solid 0.6 border -1
set boxwidth 0.6
set grid ytics
set yrange [0:*]
set xrange [-0.6:*]
set title 'pushes/s (millions)'
plot '{plot_work}/throughput.dat' using 0:2:xtic(1) with boxes notitle, \\
     '' using 0:2:(sprintf('%.2f', $2)) with labels offset 0,0.8 notitle, \\
     5 with lines dt 2 lc 'gray' title 'aim 5 M'
set title 'server CPU per push, µs'
plot '{plot_work}/throughput.dat' using 0:3:xtic(1) with boxes lc 2 notitle, \\
     '' using 0:3:(sprintf('%.3f', $3)) with labels offset 0,0.8 notitle
unset multiplot
""",
    "plot-latency.svg": svg + f"""
set output '{plot_work}/plot-latency.svg'
set title 'send→push latency distributions (HdrHistogram percentiles; the median run of each)'
set logscale x
set logscale y
set xrange [1:100000]
set xtics ('0 %%' 1, '50 %%' 2, '90 %%' 10, '99 %%' 100, '99.9 %%' 1000, '99.99 %%' 10000)
set xlabel 'percentile'
set ylabel 'ms'
set key top left
set grid
plot """ + ", \\\n     ".join(
        [f"'{path}' skip 2 using 4:1 with lines lw 2 title '{title}'" for path, title in lines]
        + ["1 with lines dt 2 lc 'gray' title 'aim: p99 < 1 ms (direct, half rate)'"]) + "\n",
}
if floor_us:
    with open(os.path.join(plot_work, "floor.dat"), "w") as d:
        d.write(f"100 {floor_us}\n")
rendered = []
if not shutil.which("gnuplot"):
    print("skipped plots: gnuplot not found", file=sys.stderr)
else:
    for name, script in plots.items():
        if name == "plot-cost-per-push.svg" and not sweep or name == "plot-latency.svg" and not lines:
            print(f"skipped {name}: no data", file=sys.stderr)
            continue
        done = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
        made = os.path.join(plot_work, name)
        if done.returncode == 0 and os.path.exists(made):
            shutil.move(made, os.path.join(results_dir, name))
            rendered.append(name)
        else:
            print(f"skipped {name}: gnuplot failed: {done.stderr.strip()}", file=sys.stderr)

# The aims block.
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
cols = ["scenario", "aim", f"measured (median of {rounds})", "measured/aim", "met?"]
keys = ["scenario", "aim", "measured", "ratio", "met"]
if baseline:
    cols += ["baseline (median)", "change"]
    keys += ["baseline", "change"]
cols.append("command")
keys.append("command")
table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
table += ["| " + " | ".join(str(a.get(k, "-")) for k in keys) + " |" for a in aims]
ab_note = (f" A/B: the baseline `{baseline}` and this commit's broker alternate in each round of the "
           "broadcast 1 × 100 and direct max-rate runs, each on a fresh broker; change is this commit's "
           "against the baseline (for µs and CPU lower is better, for rates higher)." if baseline else "")
aims_lines = [
    "## Issue 14 aims",
    "",
    f"{date}, commit {sha}, {os.cpu_count()} cores ({cpu_model}); {rounds} round(s) of {duration} s runs, "
    "medians; each round runs the broker (fresh), the floor and nats-server one after the other, so the "
    f"ratios come from runs made side by side.{ab_note} Broker CPU is the broker's (or the reference "
    "server's) CPU time over the run, from /proc.",
    "",
] + table + [""]
if rendered:
    names = {"plot-cost-per-push.svg": "cost per push against peers per mesh",
             "plot-throughput.svg": "throughput and cost per push against the floor and NATS",
             "plot-latency.svg": "send→push latency distributions"}
    aims_lines += ["Plots (gnuplot; the latency curves from the `.hgrm` files in [hgrm/](hgrm/)): "
                   + ", ".join(f"[{names[n]}]({n})" for n in rendered) + ".", ""]
    aims_lines += [f"![{names[n]}]({n})" for n in rendered] + [""]

# The matrix.
def pct(p, k):
    return "-" if not p or not p.get("count") else f"{p[k]:.3f}"


matrix = [
    "## The matrix",
    "",
    f"- date: {date}",
    f"- commit: {sha}",
    f"- machine: {os.cpu_count()} cores, {cpu_model}, kernel {platform.release()}, open-files limit {fds}",
    "- broker and loadgen on the same machine, embedded Postgres; produced by `bench/run.sh`"
    + (f"; baseline broker `{baseline}`" if baseline else ""),
    "",
    "| run | aim | sends/s | pushes/s | p99 ack ms | p99 push ms | broker µs/send | broker µs/push | broker CPU % | loadgen CPU % | other | lost | ok |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def label(r):
    tags = [t for t in [r["side"] if r["side"] != "current" else "", f"round {r['round']}" if rounds > 1 else ""] if t]
    return r["label"] + (f" [{', '.join(tags)}]" if tags else "")


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
    lag = r.get("schedule_lag_ms")
    if lag and not d:
        kept = "kept" if r.get("kept_schedule") else "NOT kept"
        other = "; ".join(x for x in [other, f"schedule {kept}: lag p99 {pct(lag, 'p99')} ms"] if x)
    matrix.append("| " + " | ".join([
        label(r), r["aim"], f(r.get("sends_per_s")), f(r.get("pushes_per_s")),
        pct(r.get("ack_ms"), "p99"), pct(r.get("push_ms"), "p99"),
        f(r.get("broker_cpu_us_per_send"), 2), f(r.get("broker_cpu_us_per_push"), 3),
        f(r.get("broker_cpu_pct")), f(r.get("loadgen_cpu_pct")), other,
        str(r.get("lost", "-")), "yes" if r.get("ok") else "NO: " + str(r.get("failure") or ""),
    ]) + " |")
matrix += ["", "CPU % is of one core (200 % = both cores). Which side ran out of CPU: compare the broker's and loadgen's columns with 200 %. Floor and NATS rows: \"broker\" is the reference server.", "", "## Commands", ""]
for r in rows:
    target = "" if r["side"] in ("floor", "nats") else " --url ws://127.0.0.1:PORT/ws --database-url …"
    matrix.append(f"- {label(r)}: `{r['args']}{target} --json`")
matrix += ["", "## Raw reports", "", "```"] + [json.dumps(r) for r in rows] + ["```"]


# Write OUT: each block replaces what the last run wrote between its
# markers; hand-written notes outside them (the optimization log) are kept.
def put(text, name, lines, after_title):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin] + lines + [end])
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    if after_title and text.startswith(TITLE + "\n"):
        return TITLE + "\n\n" + block + "\n" + text[len(TITLE) + 1:]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


old = open(out).read() if os.path.exists(out) else ""
text = put(old, "matrix", matrix, False)
if not text.startswith(TITLE + "\n"):
    text = TITLE + "\n\n" + text
text = put(text, "aims", aims_lines, True)
open(out, "w").write(text)
print("\n".join(["", "Issue 14 aims:"] + table + [""]), file=sys.stderr)
print(f"wrote {out}" + (f" and {', '.join(rendered)}" if rendered else ""), file=sys.stderr)
