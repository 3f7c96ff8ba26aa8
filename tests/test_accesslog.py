"""The access log, on a real server process: the combined format, stream lines, redaction, JSON, failures."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import ROOT, LoggingServer, ServerProcess, SSEClient, raw, request

from monkestream.accesslog import AccessLog, escape, redact
from monkestream.http11 import Request
from monkestream.logs import LogFile

TOKEN = "s3cr3t-publish-token"
COMBINED = re.compile(
    r'^(?P<host>\S+) - - \[(?P<time>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)" (?P<seconds>\d+\.\d{3})(?: closed=(?P<closed>\w+))?$')


def parsed(lines: list[str]) -> list[re.Match[str]]:
    matches = [COMBINED.match(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m is not None]


def test_accesslog_rule_1_a_request_is_one_combined_format_line_with_its_status_size_and_seconds(tmp_path):
    with LoggingServer(tmp_path, "--token", TOKEN) as srv:
        status, _, health = request(srv.port, "GET", "/healthz",
                                    headers={"Referer": "https://page.example/live", "User-Agent": "probe/1.0"})
        assert status == 200
        status, _, posted = request(srv.port, "POST", "/ticker/DOGE/price", {"price": "0.5"},
                                    headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 201
        status, _, missing = request(srv.port, "GET", "/no/such/path")
        assert status == 404
        assert request(srv.port, "HEAD", "/healthz")[0] == 200
        assert b" 400 " in raw(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")[:20]
        with SSEClient(srv.port, "/ticker/DOGE/event") as client:
            assert client.status == 200
            found = srv.lines(srv.access_log, 6)
    health_line, post_line, missing_line, head_line, bad, stream = parsed(found)
    assert health_line["host"] == "127.0.0.1"
    assert (health_line["request"], health_line["status"], int(health_line["bytes"])) == (
        "GET /healthz HTTP/1.1", "200", len(health))
    assert (health_line["referer"], health_line["agent"]) == ("https://page.example/live", "probe/1.0")
    assert (post_line["request"], post_line["status"], int(post_line["bytes"])) == (
        "POST /ticker/DOGE/price HTTP/1.1", "201", len(posted))
    assert (missing_line["status"], int(missing_line["bytes"])) == ("404", len(missing))
    assert (head_line["request"], head_line["status"], head_line["bytes"]) == ("HEAD /healthz HTTP/1.1", "200", "0")
    assert (bad["request"], bad["status"], bad["referer"], bad["agent"]) == ("-", "400", "-", "-")
    assert (stream["request"], stream["status"], stream["bytes"]) == ("GET /ticker/DOGE/event HTTP/1.1", "200", "0")
    for line in (health_line, post_line, missing_line, head_line, bad, stream):
        assert 0 <= float(line["seconds"]) < 2 and line["closed"] is None
        assert time.strptime(line["time"], "%d/%b/%Y:%H:%M:%S %z")


def test_accesslog_rule_2_a_stream_gets_a_second_line_when_it_ends_with_how_long_and_why(tmp_path):
    with LoggingServer(tmp_path, "--max-stream-age", "2") as srv:
        with SSEClient(srv.port, "/ticker/DOGE/event?left=1") as client:
            assert client.status == 200
            time.sleep(0.4)
        with SSEClient(srv.port, "/ticker/DOGE/event?aged=1") as aged:
            aged.wait_for(1, timeout=5)   # returns once the server has closed it
            assert aged.closed
        srv.lines(srv.access_log, 4)
        stopped = SSEClient(srv.port, "/events?topic=room:lobby&stopped=1")
        srv.lines(srv.access_log, 5)
        srv.stop()
        stopped.close()
    lines = parsed(srv.lines(srv.access_log))
    closes = {line["request"].split()[1]: line for line in lines if line["closed"]}
    assert len(lines) == 6 and len(closes) == 3, lines
    for line in closes.values():
        assert (line["status"], line["bytes"]) == ("200", "-")
    left, aged_line, stopped_line = (closes["/ticker/DOGE/event?left=1"], closes["/ticker/DOGE/event?aged=1"],
                                     closes["/events?topic=room:lobby&stopped=1"])
    assert left["closed"] == "client" and 0.4 <= float(left["seconds"]) < 1.6
    assert aged_line["closed"] == "max_age" and 1.6 <= float(aged_line["seconds"]) < 4
    assert stopped_line["closed"] == "shutdown"


def test_accesslog_rule_3_no_secret_is_written(tmp_path):
    with LoggingServer(tmp_path, "--token", TOKEN) as srv:
        assert request(srv.port, "GET", "/healthz?token=QS-ONE&x=1&api_key=QS-TWO",
                       headers={"Referer": "https://page.example/live?session=QS-THREE&a=b"})[0] == 200
        for token in (TOKEN, "WRONG-TOKEN"):
            request(srv.port, "POST", "/ticker/DOGE/price", {"price": "0.5"}, headers={"Authorization": f"Bearer {token}"})
        with SSEClient(srv.port, "/ticker/DOGE/event?lastEventId=&access_token=QS-FOUR") as client:
            assert client.status == 200
        lines = parsed(srv.lines(srv.access_log, 5))
    assert lines[0]["request"] == "GET /healthz?token=REDACTED&x=1&api_key=REDACTED HTTP/1.1"
    assert lines[0]["referer"] == "https://page.example/live?session=REDACTED&a=b"
    assert lines[3]["request"] == "GET /ticker/DOGE/event?lastEventId=&access_token=REDACTED HTTP/1.1"
    everything = srv.access_log.read_text() + srv.main_log.read_text()
    for secret in (TOKEN, "WRONG-TOKEN", "QS-ONE", "QS-TWO", "QS-THREE", "QS-FOUR"):
        assert secret not in everything
    assert redact("/a?token=1&user=bob&deleteKey=2&%74oken=3&Password=4&x=&auth") == \
        "/a?token=REDACTED&user=bob&deleteKey=REDACTED&%74oken=REDACTED&Password=REDACTED&x=&auth"
    assert redact("/no/query") == "/no/query"
    assert redact("/a?lastEventId=1-2&topic=room:lobby&user=sig") == "/a?lastEventId=1-2&topic=room:lobby&user=sig"


def test_accesslog_rule_4_quotes_backslashes_and_control_characters_are_escaped(tmp_path):
    assert escape('a"b\\c\x00\x1b\x7fd é') == 'a\\"b\\\\c\\x00\\x1B\\x7Fd é'
    with LoggingServer(tmp_path) as srv:
        forged = '" 200 0 "-" "x" 0.001\n127.0.0.1 - - [01/Jan/2000:00:00:00 +0000] "GET /forged'
        assert request(srv.port, "GET", "/healthz", headers={"User-Agent": forged.replace("\n", "\t")})[0] == 200
        lines = srv.lines(srv.access_log, 1)
    assert len(lines) == 1
    assert parsed(lines)[0]["agent"] == escape(forged.replace("\n", "\t"))
    assert '\\" 200 0 \\"-\\" \\"x\\" 0.001\\x09127.0.0.1' in lines[0]


def test_accesslog_rule_5_json_writes_the_same_fields_one_object_a_line(tmp_path):
    with LoggingServer(tmp_path, "--log-format", "json") as srv:
        assert request(srv.port, "GET", "/healthz?token=QS-JSON", headers={"User-Agent": "json-probe"})[0] == 200
        assert request(srv.port, "GET", "/missing")[0] == 404
        with SSEClient(srv.port, "/ticker/BTC/event") as client:
            assert client.status == 200
        lines = srv.lines(srv.access_log, 4)
    access = [json.loads(line) for line in lines]
    assert [(a["method"], a["target"], a["status"]) for a in access] == [
        ("GET", "/healthz?token=REDACTED", 200), ("GET", "/missing", 404),
        ("GET", "/ticker/BTC/event", 200), ("GET", "/ticker/BTC/event", 200)]
    first = access[0]
    assert first["remote_addr"] == "127.0.0.1" and first["user_agent"] == "json-probe"
    assert first["protocol"] == "HTTP/1.1" and first["referer"] is None
    assert isinstance(first["bytes"], int) and first["bytes"] > 0 and 0 <= first["seconds"] < 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert access[2]["bytes"] == 0 and "closed" not in access[2]
    assert access[3]["closed"] == "client" and access[3]["bytes"] is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_accesslog_rule_6_a_failing_write_is_reported_once_counted_and_never_raised(tmp_path, caplog):
    access = AccessLog(LogFile("/dev/full"))
    ping = Request("GET", "/healthz", "/healthz", "", "1.1", [], b"", True)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    with caplog.at_level(logging.INFO, logger="monkestream"):
        for _ in range(3):
            access.response("127.0.0.1", ping, answer, 0.001)
        assert access.errors == 3
        assert [r.levelname for r in caplog.records] == ["ERROR"]
        assert "cannot write the access log /dev/full" in caplog.records[0].getMessage()
        access.file.close()
        access.file = LogFile(str(tmp_path / "access.log"))   # the disk has room again
        access.response("127.0.0.1", ping, answer, 0.001)
        assert [r.levelname for r in caplog.records] == ["ERROR", "INFO"]
        assert "(3 lines lost)" in caplog.records[1].getMessage()
    assert '"GET /healthz HTTP/1.1" 200 2 "-" "-" 0.001' in (tmp_path / "access.log").read_text()


def test_access_log_to_standard_error(tmp_path):
    with ServerProcess(tmp_path / "db.sqlite", "--no-demo", "--access-log", "-") as srv:
        assert request(srv.port, "GET", "/healthz")[0] == 200
        deadline = time.monotonic() + 5
        while '"GET /healthz HTTP/1.1" 200' not in srv.read_log() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert re.search(r'^127\.0\.0\.1 - - \[.*\] "GET /healthz HTTP/1\.1" 200 \d+ "-" "-" \d+\.\d{3}$',
                     srv.read_log(), re.M), srv.read_log()


@pytest.mark.parametrize("flag", ["--access-log", "--log-file"])
def test_a_log_that_cannot_be_opened_stops_start_up_naming_its_flag(tmp_path, flag):
    target = str(tmp_path / "no-such-folder" / "x.log")
    done = subprocess.run([sys.executable, "-m", "monkestream", "--port", "0", "--db", str(tmp_path / "db"),
                           "--no-demo", flag, target], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines()[-1] == f"monkestream: {flag}: cannot open {target!r}: No such file or directory"
    assert "Traceback" not in done.stderr and "listening on" not in done.stderr, done.stderr
