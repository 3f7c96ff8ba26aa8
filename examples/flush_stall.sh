#!/bin/bash
# Does the event loop stall while SQLite writes a big window? p99 stream latency at
# 1,000 clients x 50 events/s, with and without a 100,000-row window flushed inside the
# measured interval, rounds interleaved; server on CPU 0, loaders on CPU 1.
#
#   examples/flush_stall.sh ROUNDS SSEBENCH_BINARY
#   e.g. examples/flush_stall.sh 3 /tmp/bench/tools/ssebench/ssebench
#
# "flush" rounds post 10 x 10,000 tickers of another symbol during the warm-up, with
# --flush-interval 6, so the one 100,000-row window is written inside the measured 10 s;
# /metrics confirms it. "quiet" rounds post nothing.
set -u
rounds=${1:?rounds}; ssebench=${2:?ssebench binary}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
preload() {  # port: 10 bulk posts of 10,000 tickers, answered 201 each
  taskset -c 1 python3 - "$1" <<'PY'
import http.client, json, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
for b in range(10):
    body = json.dumps([{"symbol": "LOAD", "price": f"{b + 1}.{i:05d}"} for i in range(10000)])
    conn.request("POST", "/tickers", body)
    resp = conn.getresponse(); resp.read()
    assert resp.status == 201, resp.status
PY
}
rows() { curl -s "127.0.0.1:$1/metrics" | awk '$1 == "monkestream_sqlite_last_batch_rows" {print $2}'; }
for r in $(seq "$rounds"); do
  for mode in quiet flush; do
    port=$((19000 + RANDOM % 400))
    db=$(mktemp -d)/stall.db
    taskset -c 0 python3 -m monkestream --port "$port" --no-demo --db "$db" --flush-interval 8 \
      --log-level warning >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    out=$(mktemp)
    taskset -c 1 "$ssebench" --port "$port" --clients 1000 --rate 50 --warmup 5 --duration 10 \
      --pid "$pid" --server-core 0 --loader-core 1 --json --quiet >"$out" &
    bpid=$!
    if [ "$mode" = flush ]; then sleep 2; preload "$port"; fi
    wait "$bpid"
    batch=$(rows "$port")
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
    python3 - "$out" "$mode" "$r" "${batch:-0}" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read())
print(f"r{sys.argv[3]} {sys.argv[2]:5s} p50 {d['lat_p50_us']/1000:.2f} ms  p99 {d['lat_p99_us']/1000:.2f} ms  "
      f"max {d['lat_max_us']/1000:.1f} ms  missing {d['missing_total']}  last window rows {sys.argv[4]}")
PY
    rm -f "$out"
  done
done
