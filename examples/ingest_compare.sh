#!/bin/bash
# Single-POST ingest, side by side: requests per server CPU-second for monkestream and
# the other servers of the benchmark kit, interleaved rounds, server on CPU 0 and wrk on
# CPU 1, median of per-round ratios (first server ÷ each other).
#
#   examples/ingest_compare.sh ROUNDS BENCH_ANCHORS_DIR [ANCHOR ...]
#   e.g. examples/ingest_compare.sh 3 /tmp/bench/anchors node-rxjs
#
# Needs wrk (Debian: apt-get install wrk). Each run: 64 keep-alive connections, 8 s.
set -u
rounds=${1:?rounds}; anchors=${2:?anchors dir}; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
lua=$(mktemp --suffix .lua)
cat >"$lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"price": 0.0731, "currency": "USD"}'
wrk.headers["Content-Type"] = "application/json"
LUA
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results=$(mktemp)
cd "$here"
for r in $(seq "$rounds"); do
  for name in monkestream "$@"; do
    port=$((19400 + RANDOM % 500))
    if [ "$name" = monkestream ]; then
      db=$(mktemp -d)/ingest.db
      taskset -c 0 python3 -m monkestream --port "$port" --no-demo --db "$db" --log-level warning \
        >/dev/null 2>&1 &
    else
      taskset -c 0 "$anchors/$name/start.sh" "$port" >/dev/null 2>&1 &
    fi
    pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    sleep 0.5
    taskset -c 1 wrk -t1 -c64 -d2s -s "$lua" "http://127.0.0.1:$port/ticker/BENCH/price" >/dev/null  # warm-up
    before=$(cpu_ticks "$pid")
    out=$(taskset -c 1 wrk -t1 -c64 -d8s -s "$lua" "http://127.0.0.1:$port/ticker/BENCH/price")
    after=$(cpu_ticks "$pid")
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    cpu=$(echo "($after - $before) / $(getconf CLK_TCK)" | bc -l)
    per=$(echo "$reqs / $cpu" | bc -l)
    printf '%s r%s %s requests, %.2f CPU-s, %.0f per CPU-s, non-2xx %s\n' "$name" "$r" "$reqs" "$cpu" "$per" "${non2xx:-0}"
    echo "$r $name $per" >>"$results"
  done
done
python3 - "$results" monkestream "$@" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for r, name, per in rows:
    by.setdefault(r, {})[name] = float(per)
first, others = sys.argv[2], sys.argv[3:]
for other in others:
    ratios = [v[first] / v[other] for v in by.values() if first in v and other in v]
    print(f"{first} / {other}: median {statistics.median(ratios):.2f}x  per round " + " ".join(f"{x:.2f}" for x in ratios))
PY
rm -f "$lua" "$results"
