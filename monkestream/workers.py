"""``--workers N``: every core of one machine, as an origin and its relays sharing one port.

One process holds one core. N processes listen on the same port with
SO_REUSEPORT, so the kernel spreads connections among them; one of them is
the origin (ingest, SQLite, charts) and the others are relays of it over a
Unix socket, so every process serves the same events under the same ids.

Theory of operation
-------------------
Rule 1: the parent serves nothing. It starts worker 0, the origin, listening
        on the port and on a Unix socket in a private directory; once that
        socket answers it starts workers 1..N-1, relays of ``unix:`` it, on
        the same port. Each worker is ``python -m monkestream`` with the
        parent's settings in its environment, and its number in ``--worker``.
Rule 2: a worker that dies is started again after a backoff (doubling up to
        ``BACKOFF_MAX_S``, from the start for one that ran a while). The
        relays keep their streams open while the origin is away and resume
        from it once it is back.
Rule 3: SIGTERM or SIGINT stops the relays first (their clients resume
        elsewhere), then the origin, which writes its last window and records
        a clean end; the parent exits once all have. A worker that does not
        stop within ``STOP_TIMEOUT_S`` is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import time

from .clock import AsyncioScheduler, Scheduler, within
from .config import Config, env_name

log = logging.getLogger("monkestream")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_RUN_S = 30.0       # a worker that ran this long starts its backoff over
ORIGIN_WAIT_S = 60.0       # for the origin's socket to answer, before the relays start anyway
STOP_TIMEOUT_S = 60.0


def worker_environment(config: Config, number: int, socket_path: str) -> dict[str, str]:
    """The environment a worker reads its settings from (Rule 1): the parent's, then its own part."""
    settings = dataclasses.replace(config, workers=1, worker=number, reuse_port=True)
    if number == 0:
        settings = dataclasses.replace(settings, unix_socket=socket_path)
    else:
        settings = dataclasses.replace(settings, upstream="unix:" + socket_path, unix_socket="")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONKESTREAM_")}
    for f in dataclasses.fields(Config):
        value = getattr(settings, f.name)
        env[env_name(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


class Worker:
    """One worker process, started again whenever it dies (Rule 2)."""

    def __init__(self, number: int, env: dict[str, str], scheduler: Scheduler) -> None:
        self.number = number
        self.scheduler = scheduler
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.restarts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "monkestream", env=self.env)
        log.info("worker %d (%s) started: pid %d", self.number, "origin" if self.number == 0 else "relay",
                 self.proc.pid)

    async def keep_running(self) -> None:
        delay = BACKOFF_MIN_S
        while True:
            assert self.proc is not None
            started = time.monotonic()
            code = await self.proc.wait()
            if self.stopping:
                return
            if time.monotonic() - started > HEALTHY_RUN_S:
                delay = BACKOFF_MIN_S
            log.warning("worker %d exited (%s); starting it again in %.1f s", self.number, _exit(code), delay)
            await self.scheduler.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            if self.stopping:
                return
            self.restarts += 1
            await self.start()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S (Rule 3)."""
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await within(self.scheduler, STOP_TIMEOUT_S, proc.wait())
        except TimeoutError:
            log.error("worker %d did not stop in %g s; killing it", self.number, STOP_TIMEOUT_S)
            proc.kill()
            await proc.wait()


def _exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


async def _answers(path: str) -> bool:
    try:
        _reader, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    return True


def _free_port(host: str) -> socket.socket:
    """A socket holding a free port in the SO_REUSEPORT group (for --port 0), bound and not listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


async def supervise(config: Config) -> None:
    """Run the workers until SIGTERM or SIGINT (Rules 1-3)."""
    holder = _free_port(config.host) if config.port == 0 else None
    if holder is not None:
        config = dataclasses.replace(config, port=holder.getsockname()[1])
    private = tempfile.mkdtemp(prefix="monkestream-")  # mode 0700: only this user reaches the socket
    socket_path = os.path.join(private, "origin.sock")
    scheduler = AsyncioScheduler()
    workers = [Worker(n, worker_environment(config, n, socket_path), scheduler) for n in range(config.workers)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = []
    try:
        origin, relays = workers[0], workers[1:]
        await origin.start()
        tasks.append(asyncio.create_task(origin.keep_running()))
        deadline = time.monotonic() + ORIGIN_WAIT_S
        while not await _answers(socket_path) and time.monotonic() < deadline and not stop.is_set():
            await scheduler.sleep(0.05)
        for worker in relays:
            if stop.is_set():
                break
            await worker.start()
            tasks.append(asyncio.create_task(worker.keep_running()))
        log.info("%d workers on port %d: 1 origin, %d relays", len(workers), config.port, len(relays))
        await stop.wait()
    finally:
        log.info("stopping the workers: relays first, then the origin")
        await asyncio.gather(*(w.stop() for w in workers[1:]))
        await workers[0].stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        os.rmdir(private)
        if holder is not None:
            holder.close()
        log.info("all workers stopped")

