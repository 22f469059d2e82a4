"""Background tasks that cannot die silently: the cache's flush loop and eviction, manifest
prefetches, the file watchers (policies, TLS certificates, credential files).

A task that fails is logged (``background_task_failed`` with its name and traceback),
counted (``pullgate_background_task_failures_total{task}``) and, unless it was a one-shot
best-effort job, started again after a backoff that doubles up to a ceiling and starts over
once a run has stayed up for that long. ``close()`` cancels every task and waits for them.

This is the one place (besides the HTTP boundary) that catches every ``Exception``: a
background task has no caller to hand its error to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from structlog.typing import FilteringBoundLogger

from proxy.ops.metrics import Metrics

Job = Callable[[], Awaitable[object]]
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before restart ``n`` (0-based): ``initial * 2**n``, at most ``maximum``."""

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.maximum, self.initial * 2.0 ** min(failures, 32))


class Supervisor:
    """Runs named background tasks until ``close()``; ``async with`` closes on exit."""

    def __init__(
        self,
        metrics: Metrics,
        logger: FilteringBoundLogger | None = None,
        *,
        backoff: Backoff = Backoff(),
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._log = logger or structlog.get_logger("pullgate.tasks")
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._closed = False

    def start(self, name: str, job: Job, *, restart: bool = True) -> bool:
        """Run ``job()`` as a task named ``name``. ``restart``: a failed run is followed by a
        new ``job()`` after the backoff until one completes (loops never complete); without
        it, a failure is logged and counted and the task ends. False once closed."""
        if self._closed:
            return False
        self._metrics.background_task_failures.labels(name)  # the series exists from the start
        task = asyncio.create_task(self._supervise(name, job, restart), name=name)
        self._tasks[task] = name
        task.add_done_callback(self._tasks.pop)
        return True

    def active(self, name: str) -> bool:
        """Whether a task named ``name`` is still running (or waiting to restart)."""
        return name in self._tasks.values()

    async def _supervise(self, name: str, job: Job, restart: bool) -> None:
        failures = 0
        while True:
            started = self._clock()
            try:
                await job()
                return
            except Exception as exc:  # noqa: BLE001 - the edge of a background task: nobody else would see it
                if self._clock() - started >= self._backoff.maximum:
                    failures = 0  # it ran long enough to count as healthy: start the backoff over
                delay = self._backoff.delay(failures)
                failures += 1
                self._metrics.background_task_failures.labels(name).inc()
                self._log.error(
                    "background_task_failed",
                    task=name,
                    failures=failures,
                    restart_in=delay if restart else None,
                    exc_info=exc,
                )
            if not restart:
                return
            await self._sleep(delay)

    async def close(self) -> None:
        """Cancel every task and wait until they have all ended."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@asynccontextmanager
async def supervised(
    metrics: Metrics, name: str, job: Job, logger: FilteringBoundLogger | None = None
) -> AsyncIterator[None]:
    """Run one restarting task (a file watcher) for as long as the context lasts."""
    async with Supervisor(metrics, logger) as tasks:
        tasks.start(name, job)
        yield
