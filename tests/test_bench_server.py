"""The load generator against the real server: multiplexed streams, late opens and resumes are exact.

The server runs as a subprocess, as a user would run it, and chat comments are
posted while the bench publishes, so room events are interleaved with prices on
every stream (and their text looks like a bench event to anything that does not
read SSE frames).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from helpers import ROOT, ServerProcess, request

RUN_TIMEOUT_S = 30
STREAM_PATH = "/events?topic=ticker:%s&topic=room:lobby&user=bench"


@pytest.fixture
def server(tmp_path):
    with ServerProcess(tmp_path / "bench.db", "--no-demo", "--comment-rate", "10000",
                       "--comment-burst", "10000") as proc:
        yield proc


def post_comments(port: int, stop: threading.Event) -> int:
    posted = 0
    while not stop.wait(0.02):
        text = f'{{"symbol":"BENCH","price":{posted}}}'
        status, _, _ = request(port, "POST", "/room/lobby/comments", {"user": "chatter", "text": text})
        posted += status == 201
    return posted


def run_bench(port: int, *extra: str) -> dict:
    argv = ["--port", str(port), "--clients", "40", "--workers", "2", "--duration", "2", "--warmup", "0.5",
            "--drain", "5", "--settle", "0.2", "--json", "--quiet", *extra]
    done = subprocess.run([sys.executable, "-W", "error", "-m", "monkestream", "bench", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("rate", ["0", "400"], ids=["closed-loop", "400-per-s"])
def test_multiplexed_late_and_resumed_streams_are_exact_on_the_real_server(server, rate):
    stop = threading.Event()
    posted: list[int] = []
    poster = threading.Thread(target=lambda: posted.append(post_comments(server.port, stop)))
    poster.start()
    try:
        f = run_bench(server.port, "--stream-path", STREAM_PATH, "--rate", rate,
                      "--late-clients", "12", "--reconnect", "12")
    finally:
        stop.set()
        poster.join(10)
    assert posted and posted[0] > 20, "room events were interleaved with the prices"
    assert f["connected"] == 40 and f["published_window"] > 0 and f["drain_complete"]
    assert f["pub_statuses"].keys() == {"201"}
    assert f["late_connected"] == 12 and not f["late_failures"]
    assert f["reconnects"] == f["resumed"] == f["resumed_streams"] == 12 and not f["resume_failures"]
    assert f["parse_errors"] == f["bogus_seq"] == 0
    assert f["missing_total"] == f["clients_missing"] == 0
    assert f["resumed_missing"] == f["resumed_dup"] == f["resumed_ooo"] == 0
    assert f["late_missing"] == f["late_ooo"] == 0
    assert f["ooo_total"] == f["streams_ooo"] == 0
    assert f["late_dup"] == 0, f["worst_stream"]
    assert f["dup_total"] == f["streams_dup"] == 0
    assert f["worst_stream"] is None
