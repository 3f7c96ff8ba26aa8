"""A small reconnect storm (examples/reconnect_storm.py): every stream resumes its gap exactly after a restart."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT

STREAMS = 200


def test_a_small_reconnect_storm_resumes_every_stream_exactly():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reconnect_storm.py"), "--streams", str(STREAMS), "--workers", "2",
         "--events-before", "10", "--events-after", "10", "--timeout", "10", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    f = json.loads(done.stdout)
    assert f["reconnected"] == STREAMS and f["not_live"] == 0 and not f["stream_failures"]
    assert f["exact_streams"] == STREAMS
    assert f["missing_total"] == f["dup_total"] == f["ooo_total"] == 0
    assert f["probes"] > 0 and f["probe_failures"] == 0
    assert 0 < f["live_ms"]["p50"] <= f["live_ms"]["p100"]
    assert abs(f["live_ms"]["p100"] - f["last_live_s"] * 1000) < 1
    assert f["worst_stall_ms"] >= f["probe_p99_ms"] >= f["probe_p50_ms"] > 0
