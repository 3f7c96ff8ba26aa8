"""Supervised background pipelines: a crash is logged at once, counted, shown, and the pipeline restarted.

Theory of operation
-------------------
Rule 1: a pipeline is a coroutine function, run as a task. When it returns,
        it has finished (its source ended); it is not run again.
Rule 2: when it raises, the error is logged at once with its traceback,
        counted, and the pipeline is run again after a backoff:
        ``BACKOFF_MIN_S``, doubled for each crash in a row up to
        ``BACKOFF_MAX_S``; a run that lasted ``BACKOFF_RESET_S`` starts the
        doubling over. The backoff waits on the supervisor's ``Scheduler``.
Rule 3: what a crashed run had in hand is the pipeline's own to keep: it is
        the same function that runs again (the store pipeline first writes
        the batches it took and had not written).
Rule 4: ``stop()`` is for a shutdown whose sources are closed: a pipeline
        waiting out its backoff runs again at once, so that it can finish
        what it holds, and a pipeline that crashes ``STOP_RETRIES`` times
        while stopping is given up, logged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .clock import Handle, Scheduler

log = logging.getLogger("monkestream")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 60.0     # a run this long is healthy: the next crash waits BACKOFF_MIN_S again
STOP_RETRIES = 3


@dataclass
class Pipeline:
    """One supervised pipeline and what is known of it."""

    name: str
    run: Callable[[], Awaitable[None]]
    state: str = "running"       # running, restarting (in its backoff), finished or failed (given up)
    restarts: int = 0
    last_error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def health(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "lastError": self.last_error}


class Supervisor:
    """Runs pipelines as tasks and restarts those that crash (Rule 2)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.pipelines: dict[str, Pipeline] = {}
        self.stopping = False
        self._wakers: set[asyncio.Future[None]] = set()

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> Pipeline:
        """Run ``run()`` as the pipeline ``name``, again whenever it crashes."""
        pipeline = self.pipelines[name] = Pipeline(name, run)
        pipeline.task = asyncio.get_running_loop().create_task(self._keep(pipeline), name=name)
        return pipeline

    @property
    def healthy(self) -> bool:
        return all(p.state in ("running", "finished") for p in self.pipelines.values())

    async def stop(self) -> None:
        """Wait for every pipeline to finish, its source closed by the caller (Rule 4)."""
        self.stopping = True
        for waker in list(self._wakers):
            if not waker.done():
                waker.set_result(None)
        for pipeline in self.pipelines.values():
            if pipeline.task is not None:
                await pipeline.task

    async def _keep(self, pipeline: Pipeline) -> None:
        backoff = BACKOFF_MIN_S
        crashes_stopping = 0
        while True:
            started = self.scheduler.now()
            pipeline.state = "running"
            try:
                await pipeline.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a task root: logged, counted, restarted
                pipeline.last_error = f"{type(exc).__name__}: {exc}"
                if self.stopping:
                    crashes_stopping += 1
                    if crashes_stopping >= STOP_RETRIES:
                        pipeline.state = "failed"
                        log.error("pipeline %s failed while stopping; given up", pipeline.name, exc_info=exc)
                        return
                if self.scheduler.now() - started >= BACKOFF_RESET_S:
                    backoff = BACKOFF_MIN_S
                delay = 0.0 if self.stopping else backoff
                pipeline.restarts += 1
                pipeline.state = "restarting"
                log.error("pipeline %s failed; restarting it in %g s", pipeline.name, delay, exc_info=exc)
                await self._wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            else:
                pipeline.state = "finished"
                return

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` on the scheduler, or until ``stop()``."""
        if delay <= 0:
            await self.scheduler.sleep(0)
            return
        waker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer: Handle = self.scheduler.call_later(delay, lambda: waker.done() or waker.set_result(None))
        self._wakers.add(waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._wakers.discard(waker)
