"""Event-loop lag: how late the loop runs a callback that asked to run now.

One small task sleeps ``interval`` and measures how much later than that it woke up. Any
blocking call on the loop (SQLite, a file read, a CPU-bound parse) shows up here as lag,
and every client of the process waits that long. Observed into
``pullgate_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

INTERVAL = 0.1


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


async def watch_loop_lag(
    histogram: Observer, interval: float = INTERVAL, clock: Callable[[], float] = time.perf_counter
) -> None:
    """Run until cancelled."""
    while True:
        started = clock()
        await asyncio.sleep(interval)
        histogram.observe(max(clock() - started - interval, 0.0))
