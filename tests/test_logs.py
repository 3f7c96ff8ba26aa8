"""Log files: reopened on SIGHUP (a real server process), written line by line, JSON lines, reopen failures."""

from __future__ import annotations

import json
import logging
import signal
import sys

from helpers import LoggingServer, request

from monkestream.logs import JsonFormatter, LineHandler, LogFile


def test_logs_rule_1_sighup_reopens_the_access_log_and_the_log_file(tmp_path):
    with LoggingServer(tmp_path) as srv:
        assert request(srv.port, "GET", "/healthz?before=1")[0] == 200
        srv.lines(srv.access_log, 1)
        rotated_access, rotated_main = tmp_path / "access.log.1", tmp_path / "main.log.1"
        srv.access_log.rename(rotated_access)
        srv.main_log.rename(rotated_main)
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(srv.main_log, rb"log files reopened")
        assert request(srv.port, "GET", "/healthz?after=1")[0] == 200
        fresh = srv.lines(srv.access_log, 1)
        assert len(fresh) == 1 and '"GET /healthz?after=1 HTTP/1.1" 200 ' in fresh[0], fresh
        old = srv.lines(rotated_access)
        assert len(old) == 1 and '"GET /healthz?before=1 HTTP/1.1" 200 ' in old[0], old
        assert b"listening on" in rotated_main.read_bytes()
        assert b"listening on" not in srv.main_log.read_bytes()
        srv.proc.send_signal(signal.SIGHUP)   # nothing moved this time: the same files, appended to
        srv.wait_for(srv.main_log, rb"log files reopened(.|\n)*log files reopened")
        assert request(srv.port, "GET", "/healthz?again=1")[0] == 200
        assert len(srv.lines(srv.access_log, 2)) == 2
    assert "stopped cleanly" in srv.main_log.read_text()
    stderr = LogFile("-")
    stderr.reopen()   # standard error is never reopened (nor closed)
    stderr.write("")
    assert not sys.stderr.closed


def test_logs_rule_2_every_line_reaches_the_file_as_it_is_written(tmp_path):
    file = LogFile(str(tmp_path / "x.log"))
    file.write("one\n")
    assert (tmp_path / "x.log").read_text() == "one\n"   # not closed, not flushed by hand
    handler = LineHandler(file)
    logger = _private_logger(handler)
    logger.warning("two %s", "parts")
    assert (tmp_path / "x.log").read_text() == "one\ntwo parts\n"
    handler.close()


def test_logs_rule_3_json_is_one_object_a_line_with_the_traceback_inside(tmp_path):
    handler = LineHandler(LogFile(str(tmp_path / "x.log")))
    handler.setFormatter(JsonFormatter())
    logger = _private_logger(handler)
    logger.info('a "quoted"\nmessage')
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("it failed")
    handler.close()
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == 'a "quoted"\nmessage' and first["level"] == "info"
    assert first["logger"] == "test_logs.private" and "exception" not in first
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "error" and second["message"] == "it failed"
    assert second["exception"].startswith("Traceback") and "ValueError: boom" in second["exception"]


def test_logs_rule_4_a_file_that_cannot_be_reopened_is_reported_and_the_old_one_kept(tmp_path, caplog):
    folder = tmp_path / "logs"
    folder.mkdir()
    file = LogFile(str(folder / "x.log"))
    file.write("before\n")
    folder.rename(tmp_path / "moved")            # the path's folder is gone: it cannot be opened again
    with caplog.at_level(logging.ERROR, logger="monkestream"):
        file.reopen()
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot reopen {folder / 'x.log'} (No such file or directory); still writing to the file it was"]
    file.write("after\n")
    file.close()
    assert (tmp_path / "moved" / "x.log").read_text() == "before\nafter\n"


def _private_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("test_logs.private")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger
