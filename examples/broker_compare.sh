#!/bin/bash
# A node on a Redis log (--broker) against one process, side by side: rounds interleaved
# (single, broker, single, broker, ...), each server on CPU 0, the load on CPU 1 (with
# Redis and, for latency, the publishing node). Prints per round and the medians:
#   sat      1,000 streams saturated (closed loop): deliveries per server CPU-second;
#   rate:50  1,000 streams, 50 events/s: latency percentiles. With the broker the
#            events are posted to a second node and the streams are on the first.
# and Redis's CPU per delivered event. Then, unless BULK=0, 1,000,000 tickers posted in
# bulk through a broker node (examples/bulk_ingest.py --broker): rate end to end, lost.
# KINDS="rate" runs one kind; PUB_CPU=0 puts the publishing node on the server's CPU
# instead of the load's, REDIS_CPU=0 Redis.
#
#   examples/broker_compare.sh ROUNDS BENCH_KIT [CLIENTS]
#   e.g. cp -r ../shared/bench /tmp/bench && examples/broker_compare.sh 5 /tmp/bench
#
# BENCH_KIT is a writable copy of the side-by-side kit: its ssebench is built there, with
# --pub-port (publish to another port than the streams') added when it lacks it.
set -u
rounds=${1:?rounds}; kit=${2:?bench kit}; clients=${3:-1000}
here=$(cd "$(dirname "$0")/.." && pwd)
src=$kit/tools/ssebench/ssebench.c
if ! grep -q pub-port "$src"; then  # one option: publishers connect to --pub-port
  python3 - "$src" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
s = s.replace("static struct sockaddr_in srv;", "static struct sockaddr_in srv;\nstatic int pub_port_opt = 0;\nstatic int publisher_connecting = 0;", 1)
s = s.replace("    int r = connect(fd, (struct sockaddr *)&srv, sizeof srv);",
              "    struct sockaddr_in dst = srv;\n    if (publisher_connecting && pub_port_opt) dst.sin_port = htons((uint16_t)pub_port_opt);\n"
              "    int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);", 1)
s = s.replace("    p->fd = open_socket(0);", "    publisher_connecting = 1;\n    p->fd = open_socket(0);\n    publisher_connecting = 0;", 1)
s = s.replace("{\"quiet\", 0, 0, 'q'},", "{\"quiet\", 0, 0, 'q'}, {\"pub-port\", 1, 0, 1001},", 1)
s = s.replace("        case 'q': quiet = 1; break;", "        case 'q': quiet = 1; break;\n        case 1001: pub_port_opt = atoi(optarg); break;", 1)
open(p, "w").write(s)
PY
fi
make -s -C "$kit/tools/ssebench" >/dev/null || { echo "build of ssebench failed" >&2; exit 2; }
bench=$kit/tools/ssebench/ssebench
out=${RESULTS:-$(mktemp /tmp/broker-compare.XXXX.jsonl)}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

one() {  # one measurement: MODE (single|broker) KIND (sat|rate) ROUND
  local mode=$1 kind=$2 round=$3 d rport p1 p2 rpid="" n1 n2="" pub args=() margs r0=0 r1=0 res
  d=$(mktemp -d)
  p1=$(port); pub=$p1
  if [ "$mode" = broker ]; then
    rport=$(port)
    taskset -c "${REDIS_CPU:-1}" redis-server --port "$rport" --bind 127.0.0.1 --dir "$d" --save '' --appendonly no >/dev/null 2>&1 &
    rpid=$!
    until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.05; done
    args=(--broker "redis://127.0.0.1:$rport/0")
  fi
  (cd "$here" && exec taskset -c 0 python3 -m monkestream --port "$p1" --no-demo --db "$d/a.db" "${args[@]}") >"$d/a.log" 2>&1 &
  n1=$!
  if [ "$mode" = broker ] && [ "$kind" = rate ]; then
    p2=$(port); pub=$p2
    (cd "$here" && exec taskset -c "${PUB_CPU:-1}" python3 -m monkestream --port "$p2" --no-demo --db "$d/b.db" "${args[@]}") >"$d/b.log" 2>&1 &
    n2=$!
  fi
  until grep -q listening "$d/a.log" 2>/dev/null && { [ -z "$n2" ] || grep -q listening "$d/b.log"; }; do sleep 0.05; done
  if [ "$kind" = sat ]; then
    margs=(--rate 0 --window 64 --pub-conns 64 --pipeline 1 --batch-us 1000 --warmup 3 --duration 10)
  else
    margs=(--rate 50 --warmup 2 --duration 10)
  fi
  [ -n "$rpid" ] && r0=$(ticks "$rpid")
  res=$(taskset -c 1 "$bench" --port "$p1" --pub-port "$pub" --clients "$clients" "${margs[@]}" --body min \
        --pid "$n1" --json --quiet 2>>"$d/bench.err")
  [ -n "$rpid" ] && r1=$(ticks "$rpid")
  echo "{\"round\":$round,\"mode\":\"$mode\",\"kind\":\"$kind\",\"redis_cpu_s\":$(( r1 - r0 ))e-2,\"r\":${res:-null}}" >>"$out"
  kill "$n1" ${n2:+"$n2"} 2>/dev/null; wait "$n1" ${n2:+"$n2"} 2>/dev/null
  if [ -n "$rpid" ]; then kill "$rpid"; wait "$rpid" 2>/dev/null; fi
  rm -rf "$d"
}

for r in $(seq "$rounds"); do
  for kind in ${KINDS:-sat rate}; do
    one single "$kind" "$r"
    one broker "$kind" "$r"
  done
done
OUT="$out" python3 - <<'PY'
import json, os, statistics
rows = [json.loads(line) for line in open(os.environ["OUT"])]
fig = {}
for d in rows:
    if d["r"]:
        fig.setdefault((d["kind"], d["mode"]), []).append(d)
def med(kind, mode, key):
    return statistics.median(d["r"][key] for d in fig[(kind, mode)])
for d in rows:
    r = d["r"] or {}
    print(f"r{d['round']} {d['kind']:4} {d['mode']:6} deliveries/CPU-s {r.get('deliveries_per_server_cpu_s', 0):>10.0f}"
          f"  p50 {r.get('lat_p50_us', 0) / 1000:6.1f} ms  p99 {r.get('lat_p99_us', 0) / 1000:6.1f} ms"
          f"  missing {r.get('missing_total')} dup {r.get('dup_total')} ooo {r.get('ooo_total')}"
          f"  redis CPU {d['redis_cpu_s']:.2f} s")
if ("sat", "broker") in fig:
    sat = [b["r"]["deliveries_per_server_cpu_s"] / s["r"]["deliveries_per_server_cpu_s"]
           for s, b in zip(fig[("sat", "single")], fig[("sat", "broker")])]
    print(f"fan-out, broker / single deliveries per server CPU-s: median {statistics.median(sat):.2f}x"
          f" (rounds {' '.join(f'{x:.2f}' for x in sat)})")
if ("rate", "broker") in fig:
    p99 = [b["r"]["lat_p99_us"] / s["r"]["lat_p99_us"] for s, b in zip(fig[("rate", "single")], fig[("rate", "broker")])]
    print(f"latency p99, broker (publish on another node) / single: median {statistics.median(p99):.2f}x"
          f" (rounds {' '.join(f'{x:.2f}' for x in p99)}); p99 single {med('rate', 'single', 'lat_p99_us') / 1000:.1f} ms,"
          f" broker {med('rate', 'broker', 'lat_p99_us') / 1000:.1f} ms")
for kind in sorted({k for k, _m in fig}):
    per = [d["redis_cpu_s"] / max(1, d["r"]["events_total"]) * 1e6 for d in fig[(kind, "broker")]]
    deliveries = [d["redis_cpu_s"] / max(1, d["r"]["deliveries_total"]) * 1e9 for d in fig[(kind, "broker")]]
    print(f"Redis CPU ({kind}): median {statistics.median(per):.1f} us per event published,"
          f" {statistics.median(deliveries):.2f} ns per event delivered (x{fig[(kind, 'broker')][0]['r']['clients']} streams)")
print(f"raw results: {os.environ['OUT']}")
PY
if [ "${BULK:-1}" != 0 ]; then
  d=$(mktemp -d); rport=$(port)
  taskset -c 1 redis-server --port "$rport" --bind 127.0.0.1 --dir "$d" --save '' --appendonly no >/dev/null 2>&1 &
  rpid=$!
  until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.05; done
  r0=$(ticks "$rpid")
  python3 "$here/examples/bulk_ingest.py" --batches 100 --broker "redis://127.0.0.1:$rport/0"
  echo "Redis CPU for the bulk: $(( $(ticks "$rpid") - r0 ))0 ms; log length $(redis-cli -p "$rport" XLEN monkestream:log)"
  kill "$rpid"; wait "$rpid" 2>/dev/null; rm -rf "$d"
fi
