#!/bin/bash
# Relays, measured end to end with the kit's ssebench: an origin and two relays of it
# (--upstream), all three pinned to CPU 0, the load on CPU 1, rounds interleaved.
#
#   examples/relay_bench.sh [ROUNDS]            (default 3)
#
# Per round, on a fresh origin + two relays:
#  1. fan-out behind relays: N clients (1,000, then 10,000; the order alternates by round)
#     split evenly over the two relays, one ssebench per relay (each with N/2 clients and
#     its own symbol, publishing FANOUT_RATE events/s to its relay, which forwards the POST
#     to the origin). The origin's CPU (utime+stime from /proc/PID/stat, and the precise
#     sum of its threads' /proc/PID/task/*/schedstat) over a window inside both loaders'
#     measured windows, divided by the events the origin published in it (its
#     monkestream_events_published_total): origin CPU per event. Relay CPU per delivery
#     comes from each loader (--pid of its relay). The origin's idle CPU (5 s with no load,
#     at the start of the round) is reported too, and the figure net of it.
#  2. latency of one relay hop: 1,000 clients x LAT_RATE events/s (a) on the origin,
#     publishing to the origin; (b) on relay 1, publishing to relay 1 (ssebench posts to
#     the port it streams from: the relay forwards the POST to the origin, so (b) adds the
#     forward hop as well as the stream hop). With an ssebench that has --pub-port (publish
#     to another port; not the kit's), also (c) "hop": streams from relay 1, publishes to the
#     origin: the stream hop alone. The order alternates by round. Each run's --pid is the
#     three servers, so CPU 0's busy share not spent by them (other load on the machine,
#     which the p99 is very sensitive to) is printed next to it.
# Then once, on a fresh origin + two relays (--max-streams 30000, capped by each process
# to its open-file limit):
#  3. idle streams: IDLE_PER_PROC clients on each of the three processes (one ssebench
#     --idle per process, its own symbol, --src-ips), each loader publishes one probe to
#     its process; reports connected, probe deliveries, the peak of streams open at once
#     (sum of the three /healthz "streams", polled every second) and each process's RSS.
#
# Environment: KIT (the side-by-side kit, default /work/shared/bench; ssebench is built
# from its source into the temp dir) or SSEBENCH (a built ssebench); FANOUT_RATE (5 per
# loader), FANOUT_WINDOW (20 s sampled), LAT_RATE (50), IDLE_PER_PROC (17000), FIGS (which
# measurements: default "1 2 3"; e.g. FIGS=2 for more latency rounds alone),
# RESULTS (JSON lines kept, default /tmp/relay_bench-DATE.jsonl), PYTHON (python3);
# HOP_ORIGIN_CPU=1 moves the origin to that CPU (with the loader) while a relay serves the
# latency clients, and back to CPU 0 while the origin does, so the relay has CPU 0 to itself
# as the origin has in its own runs (relays on other cores or machines, as deployed).
# Servers listen on --port 0 (the port is read from their log), in a temp dir removed at
# the end. uvloop is used by the servers when installed; the loop is printed.
set -u
rounds=${1:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [ROUNDS]" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
kit=${KIT:-/work/shared/bench}
fanout_rate=${FANOUT_RATE:-5}
fanout_window=${FANOUT_WINDOW:-20}
lat_rate=${LAT_RATE:-50}
idle_per_proc=${IDLE_PER_PROC:-17000}
figs=${FIGS:-1 2 3}
results=${RESULTS:-/tmp/relay_bench-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
tmp=$(mktemp -d /tmp/relay_bench.XXXXXX)
server_pids=()
loader_pids=()

cleanup() {
  local p
  for p in "${loader_pids[@]}" "${server_pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n "$(ulimit -Hn)" 2>/dev/null
echo "open-file limit: $(ulimit -n); results: $results"

if [[ -n ${SSEBENCH:-} ]]; then
  ssb=$SSEBENCH
else
  ssb=$tmp/ssebench
  gcc -O2 -Wall -std=gnu11 -o "$ssb" "$kit/tools/ssebench/ssebench.c" -lm || exit 1
fi

# ---------------------------------------------------------------- helpers
cat >"$tmp/helper.py" <<'PY'
import json, os, statistics, sys, time, urllib.request

def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    stat = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")       # utime + stime
    sched = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            sched += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
        except OSError:
            pass
    return stat, sched / 1e9

def events(port):
    for line in get(port, "/metrics").splitlines():
        if line.startswith("monkestream_events_published_total"):
            return int(float(line.split()[-1]))
    raise SystemExit("no monkestream_events_published_total")

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1

cmd = sys.argv[1]
if cmd == "sample":          # PID PORT: before a window (events, then CPU) or after it (CPU, then events)
    pid, port, when = sys.argv[2], sys.argv[3], sys.argv[4]
    if when == "start":
        e = events(port); t = time.monotonic(); s, c = cpu(pid)
    else:
        s, c = cpu(pid); t = time.monotonic(); e = events(port)
    print(json.dumps({"t": t, "stat_s": s, "sched_s": c, "events": e}))
elif cmd == "healthy":       # PORT [relay]: exit 0 once /healthz says ok (and, for a relay, connected)
    port, relay = sys.argv[2], len(sys.argv) > 3
    try:
        h = json.loads(get(port, "/healthz"))
    except Exception:
        raise SystemExit(1)
    ok = h.get("status") == "ok" and (not relay or (h.get("upstream") or {}).get("state") == "connected")
    raise SystemExit(0 if ok else 1)
elif cmd == "streams":       # PORT...: the sum of /healthz "streams"
    total = 0
    for port in sys.argv[2:]:
        try:
            total += json.loads(get(port, "/healthz"))["streams"]
        except Exception:
            pass
    print(total)
elif cmd == "rss":           # PID: VmRSS kB
    print(rss_kb(sys.argv[2]))
elif cmd == "fanout":        # RESULTS ROUND CLIENTS S0 S1 A.json B.json LOADAVG IDLE_S0 IDLE_S1
    _, _, path, rnd, clients, s0, s1, a, b, load, i0, i1 = sys.argv
    s0, s1, i0, i1 = (json.loads(x) for x in (s0, s1, i0, i1))
    idle = (i1["sched_s"] - i0["sched_s"]) / (i1["t"] - i0["t"])
    la, lb = (json.loads(open(x).read() or "{}") for x in (a, b))
    row = {"fig": "fanout", "round": int(rnd), "clients": int(clients), "loadavg": load,
           "window_s": s1["t"] - s0["t"], "events": s1["events"] - s0["events"],
           "origin_cpu_stat_s": s1["stat_s"] - s0["stat_s"], "origin_cpu_sched_s": s1["sched_s"] - s0["sched_s"],
           "origin_idle_cpu_per_s": idle, "origin_idle_events": i1["events"] - i0["events"],
           "loaders": [{k: d.get(k) for k in ("clients", "connected", "publish_rate", "published_window",
                                              "deliveries_window", "server_cpu_s", "deliveries_per_server_cpu_s",
                                              "loader_core_util", "server_core_util", "lat_p50_us", "lat_p99_us",
                                              "missing_total", "dup_total", "ooo_total", "drain_complete",
                                              "clients_closed_by_server")} for d in (la, lb)]}
    open(path, "a").write(json.dumps(row) + "\n")
    ev = max(row["events"], 1)
    relay = " ".join(f"{1e6 * d['server_cpu_s'] / d['deliveries_window']:.2f}" if d.get("deliveries_window") else "n/a"
                     for d in row["loaders"])
    print(f"  fan-out r{rnd} {clients:>5} clients: {row['events']} events in {row['window_s']:.1f}s, origin "
          f"{1e6 * row['origin_cpu_sched_s'] / ev:.0f} us/event (schedstat), {1e6 * row['origin_cpu_stat_s'] / ev:.0f} "
          f"(stat), {1e6 * (row['origin_cpu_sched_s'] - idle * row['window_s']) / ev:.0f} net of its idle "
          f"{1e3 * idle:.2f} ms/s; relays {relay} us/delivery; missing {[d.get('missing_total') for d in row['loaders']]}, "
          f"loader core {la.get('loader_core_util')}, server core {la.get('server_core_util')}")
elif cmd == "latency":       # RESULTS ROUND WHERE JSON LOADAVG
    _, _, path, rnd, where, f, load = sys.argv
    d = json.loads(open(f).read() or "{}")
    row = {"fig": "latency", "round": int(rnd), "where": where, "loadavg": load,
           **{k: d.get(k) for k in ("clients", "connected", "publish_rate", "max_publish_lag_ms", "lat_p50_us",
                                    "lat_p90_us", "lat_p99_us", "lat_max_us", "missing_total", "dup_total",
                                    "ooo_total", "server_cpu_s", "duration_s", "loader_cpu_util",
                                    "loader_core_util", "server_core_util")}}
    if d.get("duration_s") and d.get("server_core_util", -1) >= 0:   # CPU 0's busy share not spent by the 3 servers
        row["other_load_cpu0"] = d["server_core_util"] - d["server_cpu_s"] / d["duration_s"]
    open(path, "a").write(json.dumps(row) + "\n")
    print(f"  latency r{rnd} {where:>6}: p50 {d.get('lat_p50_us', 0) / 1e3:.2f} ms, p99 {d.get('lat_p99_us', 0) / 1e3:.2f} ms, "
          f"{d.get('publish_rate')} ev/s published, missing {d.get('missing_total')}, CPU 0 busy {d.get('server_core_util')}, "
          f"of which not the servers' {row.get('other_load_cpu0', float('nan')):.2f}")
elif cmd == "idle":          # RESULTS PEAK NAME:PID:JSON:RSS_PEAK...
    path, peak = sys.argv[2], int(sys.argv[3])
    row = {"fig": "idle", "peak_streams": peak, "procs": []}
    for spec in sys.argv[4:]:
        name, pid, f, rss_peak = spec.split(":")
        d = json.loads(open(f).read() or "{}")
        row["procs"].append({"name": name, "rss_at_peak_kb": int(rss_peak),
                             **{k: d.get(k) for k in ("clients", "connected", "connect_s", "connect_failed",
                                                      "probe_delivered", "probe_drain_s", "rss_before_kb",
                                                      "rss_idle_kb", "rss_after_probe_kb", "vmhwm_kb")}})
    open(path, "a").write(json.dumps(row) + "\n")
elif cmd == "summary":       # RESULTS
    rows = [json.loads(l) for l in open(sys.argv[2])]
    med = statistics.median
    fan = {}
    for r in rows:
        if r["fig"] == "fanout":
            fan.setdefault(r["round"], {})[r["clients"]] = r
    print("\n1. origin CPU per event, clients behind two relays (us/event; schedstat | /proc/PID/stat)")
    print("round | clients | events | origin us/ev sched | stat | net of idle | idle ms/s | relay1 us/dlv | relay2 us/dlv | missing | CPU 0 busy | CPU 1 busy")
    ratios_sched, ratios_stat, per = [], [], {}
    for rnd in sorted(fan):
        for n in sorted(fan[rnd]):
            r = fan[rnd][n]; ev = max(r["events"], 1)
            idle = r["origin_idle_cpu_per_s"]
            us = (1e6 * r["origin_cpu_sched_s"] / ev, 1e6 * r["origin_cpu_stat_s"] / ev,
                  1e6 * (r["origin_cpu_sched_s"] - idle * r["window_s"]) / ev)
            rel = [1e6 * d["server_cpu_s"] / d["deliveries_window"] if d.get("deliveries_window") else float("nan")
                   for d in r["loaders"]]
            per.setdefault(n, []).append((us[0], us[1], *rel, us[2]))
            print(f"{rnd:>5} | {n:>7} | {r['events']:>6} | {us[0]:>18.1f} | {us[1]:>4.0f} | {us[2]:>11.1f} | "
                  f"{1e3 * idle:>9.2f} | {rel[0]:>13.2f} | "
                  f"{rel[1]:>13.2f} | {sum(d.get('missing_total') or 0 for d in r['loaders']):>7} | "
                  f"{r['loaders'][0].get('server_core_util'):>10} | {r['loaders'][0].get('loader_core_util')}")
        ns = sorted(fan[rnd])
        if len(ns) == 2:
            lo, hi = (fan[rnd][n] for n in ns)
            f = lambda r, k: r[k] / max(r["events"], 1)
            ratios_sched.append(f(hi, "origin_cpu_sched_s") / f(lo, "origin_cpu_sched_s"))
            if f(lo, "origin_cpu_stat_s") > 0:
                ratios_stat.append(f(hi, "origin_cpu_stat_s") / f(lo, "origin_cpu_stat_s"))
    for n, v in sorted(per.items()):
        print(f"median {n:>6} clients: origin {med(x[0] for x in v):.1f} us/event (sched), {med(x[1] for x in v):.0f} (stat), "
              f"{med(x[4] for x in v):.1f} net of idle; "
              f"relays {med(x[2] for x in v):.2f} / {med(x[3] for x in v):.2f} us/delivery")
    if ratios_sched:
        print(f"origin us/event, {max(per)} / {min(per)} clients: per round " + " ".join(f"{x:.3f}" for x in ratios_sched)
              + f"  median {med(ratios_sched):.3f} (schedstat); stat: " + " ".join(f"{x:.2f}" for x in ratios_stat)
              + (f"  median {med(ratios_stat):.2f}" if ratios_stat else ""))
    lat = {}
    for r in rows:
        if r["fig"] == "latency":
            lat.setdefault(r["round"], {})[r["where"]] = r
    if lat:
        print("\n2. latency, 1,000 clients (ms): origin (publish to origin) vs relay (publish to relay, forwarded)")
        print("round | origin p50 | origin p99 | relay p50 | relay p99 | p99 relay/origin | missing o/r | other load on CPU 0 o/r")
        rs, hs = [], []
        for rnd in sorted(lat):
            o, r = lat[rnd].get("origin"), lat[rnd].get("relay")
            if not (o and r and o.get("lat_p99_us") and r.get("lat_p99_us")):
                continue
            rs.append(r["lat_p99_us"] / o["lat_p99_us"])
            print(f"{rnd:>5} | {o['lat_p50_us'] / 1e3:>10.2f} | {o['lat_p99_us'] / 1e3:>10.2f} | {r['lat_p50_us'] / 1e3:>9.2f} | "
                  f"{r['lat_p99_us'] / 1e3:>9.2f} | {rs[-1]:>16.2f} | {o['missing_total']}/{r['missing_total']:<9} | "
                  f"{o.get('other_load_cpu0', float('nan')):.2f}/{r.get('other_load_cpu0', float('nan')):.2f}")
            h = lat[rnd].get("hop")
            if h and h.get("lat_p99_us"):
                hs.append(h["lat_p99_us"] / o["lat_p99_us"])
                print(f"      hop (stream from the relay, publish to the origin): p50 {h['lat_p50_us'] / 1e3:.2f} p99 "
                      f"{h['lat_p99_us'] / 1e3:.2f}, p99 hop/origin {hs[-1]:.2f}, missing {h['missing_total']}, "
                      f"other load {h.get('other_load_cpu0', float('nan')):.2f}")
        if rs:
            g = lambda w, k: med(lat[x][w][k] for x in lat if w in lat[x] and lat[x][w].get(k)) / 1e3
            print(f"median: origin p50 {g('origin', 'lat_p50_us'):.2f} p99 {g('origin', 'lat_p99_us'):.2f}; relay p50 "
                  f"{g('relay', 'lat_p50_us'):.2f} p99 {g('relay', 'lat_p99_us'):.2f}; p99 ratio median {med(rs):.2f} "
                  f"(per round " + " ".join(f"{x:.2f}" for x in rs) + ")")
        if hs:
            print(f"median hop (publish to the origin): p50 {g('hop', 'lat_p50_us'):.2f} p99 {g('hop', 'lat_p99_us'):.2f}; "
                  f"p99 hop/origin median {med(hs):.2f} (per round " + " ".join(f"{x:.2f}" for x in hs) + ")")
    for r in rows:
        if r["fig"] == "idle":
            print(f"\n3. idle streams: peak {r['peak_streams']} open at once (sum of /healthz streams; the origin's "
                  f"includes the 2 relay streams)")
            print("process | clients | connected | probe delivered | RSS at peak MB | RSS after probe MB | kB/stream")
            c = p = 0
            for d in r["procs"]:
                c += d["connected"] or 0; p += d["probe_delivered"] or 0
                kb = ((d["rss_after_probe_kb"] or 0) - (d["rss_before_kb"] or 0)) / max(d["connected"] or 1, 1)
                print(f"{d['name']:>7} | {d['clients']:>7} | {d['connected']:>9} | {d['probe_delivered']:>15} | "
                      f"{d['rss_at_peak_kb'] / 1024:>14.1f} | {(d['rss_after_probe_kb'] or 0) / 1024:>18.1f} | {kb:.2f}")
            print(f"  total | {sum(d['clients'] for d in r['procs']):>7} | {c:>9} | {p:>15}")
PY
helper() { "$py" "$tmp/helper.py" "$@"; }

# start_server NAME ARGS...: sets SPID, SPORT, SLOOP
start_server() {
  local name=$1 line i
  shift
  (cd "$here" && exec taskset -c 0 "$py" -m monkestream --host 127.0.0.1 --port 0 --no-demo \
     --db "$tmp/$name.db" "$@") >"$tmp/$name.log" 2>&1 &
  SPID=$!
  server_pids+=("$SPID")
  for i in $(seq 200); do
    line=$(grep -m1 -o 'listening on http://[0-9.]*:[0-9]* (loop: [a-z]*' "$tmp/$name.log") && break
    kill -0 "$SPID" 2>/dev/null || { cat "$tmp/$name.log" >&2; exit 1; }
    sleep 0.05
  done
  [[ -n $line ]] || { echo "$name did not start" >&2; cat "$tmp/$name.log" >&2; exit 1; }
  [[ $line =~ :([0-9]+)\ \(loop:\ ([a-z]+) ]] || { echo "$name: cannot read its port" >&2; exit 1; }
  SPORT=${BASH_REMATCH[1]} SLOOP=${BASH_REMATCH[2]}
}

wait_healthy() {  # PORT [relay]
  local i
  for i in $(seq 200); do helper healthy "$@" && return 0; sleep 0.05; done
  echo "server on port $1 not healthy" >&2; exit 1
}

stop_servers() {
  local p
  for p in "${server_pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${server_pids[@]}"; do wait "$p" 2>/dev/null; done
  server_pids=()
}

start_trio() {  # extra args for all three; sets O_PID O_PORT R1_PID R1_PORT R2_PID R2_PORT
  start_server origin "$@"; O_PID=$SPID; O_PORT=$SPORT; local loop=$SLOOP
  wait_healthy "$O_PORT"
  start_server relay1 --upstream "http://127.0.0.1:$O_PORT" "$@"; R1_PID=$SPID; R1_PORT=$SPORT
  start_server relay2 --upstream "http://127.0.0.1:$O_PORT" "$@"; R2_PID=$SPID; R2_PORT=$SPORT
  wait_healthy "$R1_PORT" relay; wait_healthy "$R2_PORT" relay
  echo "  origin :$O_PORT pid $O_PID, relays :$R1_PORT pid $R1_PID, :$R2_PORT pid $R2_PID (loop: $loop, $SLOOP)"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

wait_for() {  # FILE PATTERN SECONDS
  local i
  for i in $(seq $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

fanout() {  # ROUND CLIENTS
  local r=$1 n=$2 half=$(($2 / 2)) s0 s1 dur=$((fanout_window + 8))
  local common=(--clients "$half" --rate "$fanout_rate" --warmup 3 --duration "$dur" --src-ips 32
                --json --loader-core 1 --server-core 0)
  taskset -c 1 "$ssb" --port "$R1_PORT" --symbol "FA$r$n" --pid "$R1_PID" "${common[@]}" >"$tmp/a.json" 2>"$tmp/a.err" &
  loader_pids+=($!)
  taskset -c 1 "$ssb" --port "$R2_PORT" --symbol "FB$r$n" --pid "$R2_PID" "${common[@]}" >"$tmp/b.json" 2>"$tmp/b.err" &
  loader_pids+=($!)
  if wait_for "$tmp/a.err" measuring 120 && wait_for "$tmp/b.err" measuring 60; then
    sleep 1
    s0=$(helper sample "$O_PID" "$O_PORT" start)
    sleep "$fanout_window"
    s1=$(helper sample "$O_PID" "$O_PORT" end)
  else
    echo "  a loader did not reach its measured window" >&2; cat "$tmp/a.err" "$tmp/b.err" >&2
  fi
  wait "${loader_pids[@]}" 2>/dev/null; loader_pids=()
  [[ -n ${s1:-} ]] && helper fanout "$results" "$r" "$n" "$s0" "$s1" "$tmp/a.json" "$tmp/b.json" "$(loadavg)" \
    "$idle0" "$idle1"
}

latency() {  # ROUND origin|relay|hop
  local r=$1 where=$2 port pub=()
  case $where in
    origin) port=$O_PORT;;
    relay) port=$R1_PORT;;
    hop) port=$R1_PORT pub=(--pub-port "$O_PORT");;   # streams from the relay, publishes to the origin
  esac
  if [[ -n ${HOP_ORIGIN_CPU:-} ]]; then  # the serving process alone on CPU 0; the other shares the loader's
    taskset -a -p -c "$([[ $where == origin ]] && echo 0 || echo "$HOP_ORIGIN_CPU")" "$O_PID" >/dev/null
  fi
  taskset -c 1 "$ssb" --port "$port" "${pub[@]}" --symbol "L${where:0:1}$r" --pid "$O_PID" --pid "$R1_PID" --pid "$R2_PID" \
    --clients 1000 --rate "$lat_rate" \
    --warmup 2 --duration 10 --json --quiet --loader-core 1 --server-core 0 >"$tmp/l.json" &
  loader_pids+=($!)
  wait "${loader_pids[@]}" 2>/dev/null; loader_pids=()
  helper latency "$results" "$r" "$where" "$tmp/l.json" "$(loadavg)"
}

# ---------------------------------------------------------------- rounds
# The kit's ssebench publishes to the port it streams from. A build with --pub-port P (publish
# to another port) also measures "hop": streams from relay 1, publishes to the origin.
pub_port=0
grep -q -- 'pub-port' "$ssb" && pub_port=1
echo "ssebench: $ssb; $rounds rounds; fan-out at $fanout_rate events/s per relay loader, latency at $lat_rate events/s"
for r in $(seq "$rounds"); do
  [[ $figs == *[12]* ]] || break
  echo "round $r ($(date -u +%H:%M:%S), load $(loadavg))"
  start_trio
  if [[ $figs == *1* ]]; then
    idle0=$(helper sample "$O_PID" "$O_PORT" start); sleep 5; idle1=$(helper sample "$O_PID" "$O_PORT" end)
  fi
  if ((r % 2)); then order=(1000 10000); lorder=(origin relay); else order=(10000 1000); lorder=(relay origin); fi
  if [[ $figs == *1* ]]; then for n in "${order[@]}"; do fanout "$r" "$n"; done; fi
  if [[ $figs == *2* ]]; then
    ((pub_port)) && lorder=("${lorder[@]/relay/relay hop}")
    for w in ${lorder[*]}; do latency "$r" "$w"; done
  fi
  stop_servers
done

# ---------------------------------------------------------------- idle streams
if [[ $figs == *3* ]]; then
  echo "idle streams: $idle_per_proc per process ($(date -u +%H:%M:%S), load $(loadavg))"
  start_trio --max-streams 30000
  specs=() k=0
  for name in origin relay1 relay2; do
    case $name in origin) port=$O_PORT pid=$O_PID;; relay1) port=$R1_PORT pid=$R1_PID;; relay2) port=$R2_PORT pid=$R2_PID;; esac
    taskset -c 1 "$ssb" --port "$port" --pid "$pid" --symbol "IDLE$k" --clients "$idle_per_proc" --idle \
      --idle-settle 20 --src-ips 64 --connect-timeout 30 --json >"$tmp/idle$k.json" 2>"$tmp/idle$k.err" &
    loader_pids+=($!)
    k=$((k + 1))
  done
  peak=0 rss_o=0 rss_1=0 rss_2=0
  while kill -0 "${loader_pids[0]}" 2>/dev/null || kill -0 "${loader_pids[1]}" 2>/dev/null \
        || kill -0 "${loader_pids[2]}" 2>/dev/null; do
    s=$(helper streams "$O_PORT" "$R1_PORT" "$R2_PORT")
    if ((s > peak)); then
      peak=$s; rss_o=$(helper rss "$O_PID"); rss_1=$(helper rss "$R1_PID"); rss_2=$(helper rss "$R2_PID")
    fi
    sleep 1
  done
  wait "${loader_pids[@]}" 2>/dev/null; loader_pids=()
  cat "$tmp"/idle?.err | grep -E 'connected|idle:' | sed 's/^/  /'
  helper idle "$results" "$peak" "origin:$O_PID:$tmp/idle0.json:$rss_o" "relay1:$R1_PID:$tmp/idle1.json:$rss_1" \
    "relay2:$R2_PID:$tmp/idle2.json:$rss_2"
  stop_servers
fi

echo
echo "servers: $("$py" -c 'import sys; print(sys.version.split()[0])'), loop $SLOOP, all three on CPU 0; loaders on CPU 1"
helper summary "$results"
