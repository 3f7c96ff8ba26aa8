"""The access log: a line per request in the combined log format, and one more when a stream ends.

Theory of operation
-------------------
Rule 1: a request's line is written as its answer goes out:

            HOST - - [TIME] "REQUEST LINE" STATUS BYTES "REFERER" "USER-AGENT" SECONDS

        the combined log format of Apache and nginx with the seconds from the
        request's arrival to its answer appended. STATUS and BYTES (the body's
        size) are read from the bytes sent, so the line says what went out.
        An event stream's line is written when its head goes out.
Rule 2: when a stream ends it gets a second line: its request again, ``-``
        for the size, the seconds it stayed open and ``closed=REASON``, a
        ``hub.CloseReason`` value (or ``error`` when the server failed it).
Rule 3: no secret is written. Of the request's fields only Referer and
        User-Agent are, so never the publish token (``Authorization``) nor a
        delete key; the value of every query parameter whose name holds
        ``token``, ``key``, ``secret``, ``pass``, ``auth``, ``sig`` or
        ``session`` becomes ``REDACTED``, in the target and the Referer alike.
Rule 4: quotes, backslashes and control characters are escaped as nginx does
        (``\\"``, ``\\\\``, ``\\xHH``), so a client cannot forge a line.
Rule 5: ``json`` writes the same fields as one object per line.
Rule 6: a failing write (a full disk) is reported once and counted, never
        raised into the server; the next line that is written ends the episode.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import unquote_plus

from .errors import ConfigError
from .http11 import Request
from .logs import LogFile, utc_iso

log = logging.getLogger("monkestream")

SECRET_NAME_PARTS = ("token", "key", "secret", "pass", "auth", "sig", "session")
REDACTED = "REDACTED"
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\x9f]')


class AccessLog:
    """Writes the access log to a ``LogFile``; ``reopen`` after logrotate."""

    def __init__(self, file: LogFile, json_lines: bool = False) -> None:
        self.file = file
        self.json_lines = json_lines
        self.errors = 0            # lines lost to failed writes
        self._failing = False
        self._streams: dict[object, tuple[str, Request, float]] = {}
        self._second = 0
        self._stamp = ""

    # -- what the server reports --------------------------------------------------

    def response(self, client: str, request: Request | None, data: bytes, seconds: float) -> None:
        """Note a response (``data``: its head and body as sent) answered in ``seconds`` (Rule 1)."""
        status = int(data[9:12])
        body_bytes = len(data) - data.find(b"\r\n\r\n") - 4
        self._write(client, request, status, body_bytes, seconds, None)

    def stream_opened(self, key: object, client: str, request: Request, now: float) -> None:
        """A stream began at ``now`` (the server's clock) on the connection ``key``."""
        self._streams[key] = (client, request, now)

    def stream_closed(self, key: object, reason: str, now: float) -> None:
        """The stream on ``key`` ended at ``now`` for ``reason`` (Rule 2); once per stream."""
        opened = self._streams.pop(key, None)
        if opened is not None:
            client, request, since = opened
            self._write(client, request, 200, None, now - since, reason)

    def reopen(self) -> None:
        self.file.reopen()

    def close(self) -> None:
        self.file.close()

    # -- lines ----------------------------------------------------------------------

    def _write(self, client: str, request: Request | None, status: int, body_bytes: int | None,
               seconds: float, closed: str | None) -> None:
        now = time.time()
        line = (self._json(now, client, request, status, body_bytes, seconds, closed) if self.json_lines
                else self._text(now, client, request, status, body_bytes, seconds, closed))
        try:
            self.file.write(line)
        except OSError as exc:
            self.errors += 1
            if not self._failing:
                self._failing = True
                log.error("cannot write the access log %s (%s); lines are lost until it can",
                          self.file.path, exc.strerror)
            return
        if self._failing:
            self._failing = False
            log.info("the access log %s is written again (%d lines lost)", self.file.path, self.errors)

    def _text(self, now: float, client: str, request: Request | None, status: int, body_bytes: int | None,
              seconds: float, closed: str | None) -> str:
        if request is None:
            first, referer, agent = "-", "-", "-"
        else:
            first = escape(f"{request.method} {redact(request.target)} HTTP/{request.version}")
            referer = escape(redact(request.header("referer") or "-"))
            agent = escape(request.header("user-agent") or "-")
        size = "-" if body_bytes is None else str(body_bytes)
        tail = "" if closed is None else f" closed={closed}"
        return (f'{escape(client)} - - [{self._local_time(now)}] "{first}" {status} {size} '
                f'"{referer}" "{agent}" {seconds:.3f}{tail}\n')

    def _json(self, now: float, client: str, request: Request | None, status: int, body_bytes: int | None,
              seconds: float, closed: str | None) -> str:
        out: dict[str, Any] = {"time": utc_iso(now), "remote_addr": client}
        if request is not None:
            out.update(method=request.method, target=redact(request.target), protocol=f"HTTP/{request.version}",
                       referer=redact(request.header("referer") or "") or None,
                       user_agent=request.header("user-agent"))
        out.update(status=status, bytes=body_bytes, seconds=round(seconds, 6))
        if closed is not None:
            out["closed"] = closed
        return json.dumps(out, ensure_ascii=False) + "\n"

    def _local_time(self, now: float) -> str:
        """``03/Dec/2026:09:15:02 +0000``, formatted at most once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            local = time.localtime(second)
            month = "JanFebMarAprMayJunJulAugSepOctNovDec"[3 * local.tm_mon - 3: 3 * local.tm_mon]  # not %b: locales
            self._stamp = time.strftime(f"%d/{month}/%Y:%H:%M:%S %z", local)
        return self._stamp


def redact(target: str) -> str:
    """``target`` with the value of every secret-looking query parameter replaced (Rule 3)."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    pairs = []
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        if equals and any(part in unquote_plus(name).lower() for part in SECRET_NAME_PARTS):
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return f"{path}?{'&'.join(pairs)}"


def escape(text: str) -> str:
    """Quotes, backslashes and control characters as ``\\"``, ``\\\\`` and ``\\xHH`` (Rule 4)."""
    return _UNSAFE.sub(lambda m: "\\" + m.group() if m.group() in '"\\' else f"\\x{ord(m.group()):02X}", text)


def open_access_log(path: str, fmt: str = "text") -> AccessLog | None:
    """The access log ``--access-log`` asks for (None when it is off); ConfigError if it cannot be opened."""
    if not path:
        return None
    try:
        return AccessLog(LogFile(path), json_lines=fmt == "json")
    except OSError as exc:
        raise ConfigError(f"--access-log: cannot open {path!r}: {exc.strerror}") from None
