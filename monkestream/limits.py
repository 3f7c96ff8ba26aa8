"""The open-file limit: how many streams a process can hold, and accepting connections at that limit.

Theory of operation
-------------------
Rule 1: every connection costs a descriptor, and so do the process's own
        files. At start the soft ``RLIMIT_NOFILE`` is raised to the hard
        limit, and the streams are capped so that ``PROCESS_FDS`` plus a
        reserve for API requests (``REQUEST_FDS_MIN``, or
        ``REQUEST_FDS_SHARE`` of the limit if more) stay free when every
        stream is open: a full server still answers ``/healthz`` and ingest.
Rule 2: the server accepts connections itself (``Acceptor``), the same way
        on every event loop. When ``accept()`` fails for want of descriptors
        (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM), it stops accepting for
        ``ACCEPT_RETRY_S`` and tries again; connections already open are not
        touched. (The loops' own servers differ at that limit: asyncio logs a
        traceback for every failed ``accept()`` and leaves the waiting
        clients hanging; uvloop closes them unanswered, and closes its
        listening socket for good once libuv's own spare is gone.)
Rule 3: nobody waits long on a server that cannot take them. When
        descriptors are still short after a pause (by then the waiting
        clients have sent their requests, and some descriptors may have come
        free), one kept spare is let go, and the connections waiting in the
        listen queue are accepted one at a time, in batches, given the
        refusal their request calls for (``refusal(request_bytes)``), and
        closed; then the spare is taken back. One whose request has not
        arrived is closed unanswered: an EventSource retries after that.
Rule 4: one log line per episode, not per attempt: failures less than
        ``EPISODE_QUIET_S`` apart are one episode. Episodes and refused
        connections are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from typing import Callable

from .clock import Handle, Scheduler

log = logging.getLogger("monkestream")

PROCESS_FDS = 32          # standard streams, the event loop's own, listening sockets, SQLite's six, the spare, logs
REQUEST_FDS_MIN = 32      # connections kept for API requests when every stream is open ...
REQUEST_FDS_SHARE = 0.05  # ... or this share of the limit, if more
UNLIMITED_FILES = 1 << 20  # what an unlimited hard limit is taken to be

ACCEPT_BATCH = 64         # connections accepted, or refused, per wake-up: a burst never holds up the loop
ACCEPT_RETRY_S = 0.25     # how long accepting stops when descriptors or memory run short
EPISODE_QUIET_S = 10.0    # failures closer together than this are one episode (one log line)
REFUSE_GAP_S = 0.01       # between batches of refusals: the loop's other work, and time for requests to arrive
REFUSAL_READ_BYTES = 16 * 1024   # what is read of a refused connection's request
SHORTAGES = {errno.EMFILE: "too many open files", errno.ENFILE: "too many open files in the system",
             errno.ENOBUFS: "out of socket buffers", errno.ENOMEM: "out of memory"}


# -- capacity (Rule 1) -------------------------------------------------------------------


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one, as far as the system allows; return (before, after)."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise, nothing known
        return UNLIMITED_FILES, UNLIMITED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, target = (UNLIMITED_FILES if n == resource.RLIM_INFINITY else n for n in (soft, hard))
    if before >= target:
        return before, before
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return before, before
    return before, target


def reserved_fds(limit: int) -> int:
    """Descriptors kept from streams under ``limit``: the process's own and room for requests."""
    return PROCESS_FDS + max(REQUEST_FDS_MIN, int(limit * REQUEST_FDS_SHARE))


def stream_capacity(limit: int) -> int:
    """How many streams fit under an open-file limit of ``limit`` (at least one)."""
    return max(1, limit - reserved_fds(limit))


def fit_streams(max_streams: int) -> int:
    """Raise the open-file limit, log the capacity in one line, and return ``max_streams`` capped to it."""
    before, limit = raise_open_file_limit()
    capacity = stream_capacity(limit)
    raised = f" (raised from {before})" if limit > before else ""
    log.info("open files: limit %d%s, room for %d streams; %d kept for the process, requests and SQLite",
             limit, raised, capacity, limit - capacity)
    if max_streams > capacity:
        log.warning("--max-streams %d is more than an open-file limit of %d allows: using %d "
                    "(raise the hard limit: LimitNOFILE= in systemd, ulimit -Hn)", max_streams, limit, capacity)
        return capacity
    return max_streams


# -- listening and accepting (Rules 2 to 4) --------------------------------------------


async def listen(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets on every address ``host`` resolves to.

    ``reuse_port``: processes that all set it share the port, the kernel
    spreading connections among them (SO_REUSEPORT).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen_unix(path: str, backlog: int) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` (a stale one left by a crash is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class Acceptor:
    """Accepts connections on listening sockets and hands each to ``on_accept``; pauses at a shortage.

    ``refusal(data)`` gives the bytes to answer a connection refused at the
    limit, from what it had sent (b"" answers nothing: it is just closed).
    """

    def __init__(self, sockets: list[socket.socket], on_accept: Callable[[socket.socket], object],
                 refusal: Callable[[bytes], bytes], scheduler: Scheduler) -> None:
        self.sockets = sockets
        self._on_accept = on_accept
        self._refusal = refusal
        self.scheduler = scheduler
        self.pauses: dict[str, int] = {}    # episodes, by errno name
        self.refused = 0                    # connections answered and closed for want of a descriptor
        self.short_of: str | None = None    # while accepting fails: what runs short
        self._last_failure = float("-inf")
        self._resumed = False   # accepting again after a pause, the listen queue not yet emptied
        self._refusal_failed = False
        self._retry: Handle | None = None
        self._spare: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spare = _open_spare()
        self._watch()

    def close(self) -> None:
        """Stop accepting and close the listening sockets."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._unwatch()
        for sock in self.sockets:
            sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self._loop = None

    def _watch(self) -> None:
        self._resumed = self._retry is not None
        self._retry = None
        if self._loop is not None:
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        if self._loop is not None:
            for sock in self.sockets:
                if sock.fileno() >= 0:
                    self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                self._resumed = False
                return
            except OSError as exc:
                if exc.errno in SHORTAGES:
                    self._short(exc, sock)
                    return
                log.debug("accept() failed: %s", exc)  # an error of that one connection (Linux accept(2))
                continue
            self.short_of = None
            conn.setblocking(False)
            self._on_accept(conn)

    def _short(self, exc: OSError, sock: socket.socket) -> None:
        """Stop accepting for a moment; refuse who waits if a descriptor is what ran out (Rules 2 and 3)."""
        now = self.scheduler.now()
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        what = SHORTAGES[exc.errno or 0]
        descriptors = exc.errno in (errno.EMFILE, errno.ENFILE)
        if now - self._last_failure > EPISODE_QUIET_S:
            self.pauses[name] = self.pauses.get(name, 0) + 1
            log.warning("accept() failed: %s (%s): %s (retried every %g s)", what, name,
                        "refusing new connections until descriptors free up" if descriptors else
                        "new connections wait until memory frees up", ACCEPT_RETRY_S)
        self._last_failure = now
        self.short_of = what
        more = descriptors and self._resumed and self._refuse_waiting(sock)
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self.scheduler.call_later(REFUSE_GAP_S if more else ACCEPT_RETRY_S, self._watch)

    def _refuse_waiting(self, sock: socket.socket) -> bool:
        """Refuse a batch of the connections waiting (Rule 3); whether more may wait."""
        if self._spare is None:
            self._spare = _open_spare()  # taken back now that a connection may have closed
            return False
        os.close(self._spare)
        self._spare = None
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return False  # none left waiting, or descriptors still short
                with conn:
                    self.refused += 1
                    self._refuse(conn)
            return True
        finally:
            self._spare = _open_spare()

    def _refuse(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            data = conn.recv(REFUSAL_READ_BYTES)
        except OSError:
            data = b""
        try:
            answer = self._refusal(data)
        except Exception:  # noqa: BLE001 - a callback root: closed unanswered, and said once
            if not self._refusal_failed:
                log.exception("building the answer for a refused connection failed; closing them unanswered")
            self._refusal_failed = True
            answer = b""
        if answer:
            try:
                conn.send(answer)
            except OSError:
                pass
