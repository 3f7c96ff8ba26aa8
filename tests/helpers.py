"""Real clients for end-to-end tests: HTTP over sockets, SSE read like a browser, server processes."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from monkestream.sse import EventStreamParser, MessageEvent

ROOT = Path(__file__).resolve().parent.parent


def request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; JSON-encodes ``body`` unless it is bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_tickers(port: int, tickers: list[dict[str, Any]], timeout: float = 10.0) -> tuple[int, bytes]:
    """POST /tickers, retrying while the server says the database is behind (503), as feeders do."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = request(port, "POST", "/tickers", tickers)
        if status != 503 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.05)


def raw(port: int, data: bytes, timeout: float = 3.0, until_close: bool = True) -> bytes:
    """Send raw bytes; return everything received until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if not until_close and b"\r\n\r\n" in out:
                break
        return out


class SSEClient:
    """An event-stream reader over a raw socket: chunked decoding, then the WHATWG parser."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None,
                 timeout: float = 5.0, connect: bool = True, source: str | None = None) -> None:
        self.port = port
        self.source = source
        self.path = path
        self.headers = headers or {}
        self.timeout = timeout
        self.parser = EventStreamParser()
        self.events: list[MessageEvent] = []
        self.status = 0
        self.response_headers: dict[str, str] = {}
        self.closed = False
        self._buf = b""
        self._chunked = False
        self.sock: socket.socket | None = None
        if connect:
            self.connect()

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout,
                                             source_address=(self.source, 0) if self.source else None)
        lines = [f"GET {self.path} HTTP/1.1", "Host: test", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.read_head()

    def read_head(self) -> None:
        """Read the response head on ``sock`` (a request already sent), then any bytes after it."""
        assert self.sock is not None
        head = b""
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in head:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no response head: {head!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before the head: {head!r}")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.response_headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        self.header_order = [f.partition(":")[0] for f in fields]
        self._chunked = self.response_headers.get("transfer-encoding", "").lower() == "chunked"
        if self.status != 200:
            self.body = rest
            return
        self._feed(rest)

    def _feed(self, data: bytes) -> None:
        if not self._chunked:
            self.events += self.parser.feed(data)
            return
        self._buf += data
        while True:
            line_end = self._buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self._buf[:line_end].split(b";")[0], 16)
            if size == 0:
                self.closed = True
                self._buf = b""
                return
            if len(self._buf) < line_end + 2 + size + 2:
                return
            payload = self._buf[line_end + 2: line_end + 2 + size]
            self._buf = self._buf[line_end + 2 + size + 2:]
            self.events += self.parser.feed(payload)

    def pump(self, seconds: float) -> None:
        """Read whatever arrives within ``seconds``."""
        assert self.sock is not None
        deadline = time.monotonic() + seconds
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                chunk = b""
            if not chunk:
                self.closed = True
                return
            self._feed(chunk)

    def wait_for(self, count: int, timeout: float | None = None, name: str | None = None) -> list[MessageEvent]:
        """Read until ``count`` events (of type ``name``, if given) have arrived."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            got = [e for e in self.events if name is None or e.type == name]
            if len(got) >= count or self.closed or time.monotonic() > deadline:
                return got
            self.pump(min(0.05, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerProcess:
    """``python -m monkestream`` in a subprocess on an ephemeral port."""

    def __init__(self, db: Path | str, *args: str, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> None:
        self.db = str(db)
        self.args = list(args)
        self.env = env or {}
        self.preexec_fn = preexec_fn   # run in the child before the server (e.g. to lower its limits)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = b""

    def start(self, timeout: float = 10.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "monkestream", "--port", "0", "--db", self.db, *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read() or b""
            self.log += chunk
            m = re.search(rb"listening on https?://[^:]+:(\d+)", self.log)
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.decode(errors='replace')}")
            time.sleep(0.02)
        raise TimeoutError(f"server did not start: {self.log.decode(errors='replace')}")

    def read_log(self) -> str:
        if self.proc is not None and self.proc.stdout is not None:
            try:
                self.log += self.proc.stdout.read() or b""
            except (ValueError, OSError):
                pass
        return self.log.decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.read_log()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def healthz(port: int) -> dict[str, Any]:
    status, _, body = request(port, "GET", "/healthz")
    assert status == 200
    return json.loads(body)


class AppThread:
    """The application in-process, on its own event loop in a thread, so tests can inspect it."""

    def __init__(self, db: Path | str, **settings: Any) -> None:
        import asyncio
        import threading

        from monkestream.app import App
        from monkestream.config import Config

        self.config = Config(port=0, db=str(db), no_demo=True, **settings)
        self.loop = asyncio.new_event_loop()
        self.app = App(self.config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the server's loop and return its result."""
        import concurrent.futures
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        return future.result(10)

    def run(self, coro: Any) -> Any:
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __enter__(self) -> AppThread:
        self._thread.start()
        self.run(self.app.start())
        self.port = self.app.server.port
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.app.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class RouterServer:
    """A real ``Server`` and ``Hub`` answering through ``router`` on an ephemeral port, in the running loop.

    ``async with RouterServer(router) as srv``; ``await srv.exchange(raw)`` sends bytes on a new
    connection and returns what comes back until the server closes it (or ``until`` has arrived).
    """

    def __init__(self, router: Any, **settings: Any) -> None:
        from monkestream.config import Config
        from monkestream.hub import Hub
        from monkestream.server import Server

        self.hub = Hub(epoch=1)
        self.server = Server(Config(port=0, no_demo=True, **settings), self.hub, router)

    async def __aenter__(self) -> RouterServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def exchange(self, data: bytes, until: bytes | None = None, timeout: float = 5.0) -> bytes:
        import asyncio
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(data)
        out = b""
        try:
            async with asyncio.timeout(timeout):
                while until is None or until not in out:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    out += chunk
        finally:
            writer.close()
            await writer.wait_closed()
        return out


class LoggingServer:
    """``python -m monkestream`` logging to ``main.log`` and ``access.log`` in ``folder``; the port is read from the log."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.folder = folder
        self.main_log = folder / "main.log"
        self.access_log = folder / "access.log"
        cmd = [sys.executable, "-m", "monkestream", "--port", "0", "--db", str(folder / "db.sqlite"), "--no-demo",
               "--log-file", str(self.main_log), "--access-log", str(self.access_log), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.port = int(self.wait_for(self.main_log, rb"listening on http://[^:]+:(\d+)").group(1))

    def wait_for(self, path: Path, pattern: bytes, timeout: float = 10.0) -> re.Match[bytes]:
        """The first match of ``pattern`` in the file at ``path``, once it is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, path.read_bytes()) if path.exists() else None
            if found:
                return found
            assert self.proc.poll() is None, self.proc.communicate()[0]
            time.sleep(0.02)
        raise TimeoutError(f"{pattern!r} not in {path}")

    def lines(self, path: Path, count: int = 0, timeout: float = 5.0) -> list[str]:
        """The lines of ``path``, once there are at least ``count``."""
        deadline = time.monotonic() + timeout
        while True:
            found = path.read_text().splitlines() if path.exists() else []
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM; the server must exit 0 having written nothing outside its files."""
        if self.proc.stdout is None or self.proc.stdout.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            output, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        assert self.proc.returncode == 0, output
        assert output == b"", output

    def __enter__(self) -> LoggingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
