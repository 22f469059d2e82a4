"""Single flight: at most one running task per key; everyone who asks for the same key
meanwhile awaits that task's result.

Used wherever concurrent callers would otherwise repeat the same slow work: manifest
fetches, password verification, signature verification, tag resolution. The work runs as
its own task and each caller awaits it through ``asyncio.shield``, so one caller giving up
(a client disconnecting, a deadline) never cancels the work for the others. A finished
task leaves the map at once: the helper coalesces concurrent calls, it does not cache
results (callers that want caching keep a ``cachetools`` cache in front).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, key: object) -> bool:
        return key in self._running

    def keys(self) -> frozenset[K]:
        """Keys whose work is running now."""
        return frozenset(self._running)

    def joined(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[asyncio.Task[V], bool]:
        """The task for ``key``, started from ``work()`` when none runs; and whether the
        caller joined a task that was already running (for coalescing metrics)."""
        task = self._running.get(key)
        if task is not None:
            return task, True
        task = asyncio.ensure_future(work())
        self._running[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))
        return task, False

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        task, _ = self.joined(key, work)
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

    async def close(self) -> None:
        """Cancel whatever still runs and wait for it to finish (shutdown)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
