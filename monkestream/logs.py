"""Where the log goes and in what shape: standard error or a file, text or JSON lines, reopened on SIGHUP.

Theory of operation
-------------------
Rule 1: a log file is opened by its path and can be reopened (on SIGHUP): once
        logrotate has moved it away, the next line goes to a new file at the
        same path. Standard error (the path ``-``, or none) is never reopened.
Rule 2: every line reaches the file as it is written (line buffering), so
        ``tail -f`` and log shippers see it at once and a crash loses none.
Rule 3: ``json`` writes one object per line: ``time`` (UTC, ISO 8601),
        ``level``, ``logger``, ``message``, and ``exception`` with the
        traceback when there is one; a line never spans two.
Rule 4: a file that cannot be reopened is reported, and the old one is kept.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Protocol, TextIO

from .errors import ConfigError

log = logging.getLogger("monkestream")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
STDERR_PATHS = ("", "-")


class Reopenable(Protocol):
    def reopen(self) -> None:
        """Close the file and open its path again."""


class LogFile:
    """A text file appended to by path (Rules 1 and 2), or standard error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: TextIO | None = None if path in STDERR_PATHS else self._open()

    def _open(self) -> TextIO:
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)

    def write(self, text: str) -> None:
        # sys.stderr is looked up each time: it may be replaced while we run
        (self._stream or sys.stderr).write(text)

    def reopen(self) -> None:
        if self._stream is None:
            return
        try:
            fresh = self._open()
        except OSError as exc:
            log.error("cannot reopen %s (%s); still writing to the file it was", self.path, exc.strerror)
            return
        old, self._stream = self._stream, fresh
        _close(old)

    def close(self) -> None:
        if self._stream is not None:
            _close(self._stream)
            self._stream = None
            self.path = "-"


def _close(stream: TextIO) -> None:
    try:
        stream.close()
    except OSError:
        pass  # the last line could not be flushed (a full disk): its write was reported already


class LineHandler(logging.Handler):
    """Writes each record as one line to a ``LogFile``."""

    def __init__(self, file: LogFile) -> None:
        super().__init__()
        self.file = file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.file.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own convention: report on stderr, carry on
            self.handleError(record)

    def reopen(self) -> None:
        self.acquire()  # another thread (the SQLite writer's) may be writing a line
        try:
            self.file.reopen()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.file.close()
        finally:
            self.release()
        super().close()


class JsonFormatter(logging.Formatter):
    """One JSON object per record (Rule 3)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": utc_iso(record.created), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def utc_iso(seconds: float) -> str:
    """``2026-12-03T09:15:02.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def setup(level: str, fmt: str = "text", path: str = "") -> None:
    """Send every logger's records at ``level`` and above to ``path`` (standard error by default) in ``fmt``.

    This replaces whatever handlers the root logger had: the process is the server's.
    Raises ConfigError when the file cannot be opened.
    """
    try:
        handler = LineHandler(LogFile(path))
    except OSError as exc:
        raise ConfigError(f"--log-file: cannot open {path!r}: {exc.strerror}") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def reopen(*files: Reopenable) -> None:
    """Reopen the log files: the root logger's and ``files`` (on SIGHUP, Rule 1)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            handler.reopen()
    for file in files:
        file.reopen()
    log.info("log files reopened")

