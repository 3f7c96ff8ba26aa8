#!/bin/bash
# Multi-topic against single-topic fan-out, side by side: the same server, 1,000 streams,
# saturated, rounds interleaved (single, multi, single, multi, ...), the server on CPU 0 and
# the load on CPU 1; prints deliveries per server CPU-second per round and the median ratio.
#
#   examples/fanout_compare.sh ROUNDS BENCH_KIT [CLIENTS]
#   e.g. examples/fanout_compare.sh 5 /tmp/bench
#
# BENCH_KIT is a writable copy of the side-by-side kit (its anchors/run.sh); the server is
# this checkout (MONKESTREAM_CHECKOUT, default: here). Multi-topic streams are the page's:
# /events?topic=ticker:SYMBOL&topic=room:lobby.
set -u
rounds=${1:?rounds}; kit=${2:?bench kit}; clients=${3:-1000}
export MONKESTREAM_CHECKOUT=${MONKESTREAM_CHECKOUT:-$(cd "$(dirname "$0")/.." && pwd)}
tag="fanout-$(date -u +%Y%m%dT%H%M%SZ)"
results=${RESULTS:-$kit/anchors/results.jsonl}
for r in $(seq "$rounds"); do
  LABEL="$tag-single-r$r" RESULTS="$results" "$kit/anchors/run.sh" monkestream "$clients" sat
  LABEL="$tag-multi-r$r" RESULTS="$results" "$kit/anchors/run.sh" monkestream "$clients" sat \
    --stream-path '/events?topic=ticker:%s&topic=room:lobby'
done
TAG="$tag" RESULTS="$results" python3 - <<'PY'
import json, os, statistics
tag = os.environ["TAG"]
rows = [json.loads(line) for line in open(os.environ["RESULTS"]) if tag in line]
fig = {}
for d in rows:
    kind, r = d["label"][len(tag) + 1:].split("-r")
    fig.setdefault(r, {})[kind] = (d["deliveries_per_server_cpu_s"], d["missing_total"], d["ooo_total"])
ratios = []
for r in sorted(fig, key=int):
    s, m = fig[r].get("single"), fig[r].get("multi")
    print(f"r{r}: single {s[0]:.0f} (missing {s[1]}, ooo {s[2]})  multi {m[0]:.0f} (missing {m[1]}, ooo {m[2]})"
          if s and m else f"r{r}: incomplete")
    if s and m:
        ratios.append(m[0] / s[0])
print(f"multi / single: median {statistics.median(ratios):.3f}x  per round " + " ".join(f"{x:.3f}" for x in ratios))
PY
