#!/usr/bin/env python3
"""Latency probes for a load benchmark, in a process of their own.

A manifest prober in the benchmark's own process measures that process: with 200 client
threads reading bodies, a probe thread waits for the GIL for hundreds of milliseconds
(first full storm run: manifest p99 607 ms, most of it spent before the request left).
Here, with stdin as the stop signal (the benchmark closes it), this process

  * GETs ``url`` every ``interval`` seconds on its own connection (manifest latency as a
    client beside the storm sees it), and
  * runs a bare asyncio loop that sleeps 100 ms and records how late it wakes up — the same
    measurement as ``pullgate_event_loop_lag_seconds``, for a loop that does nothing: what
    the machine's CPU scheduling alone does to any event loop under this load (the floor
    pullgate's own lag is read against),

then prints one JSON object: ``latencies``, ``errors``, ``canary_lags`` (seconds).

As a library: ``with Probes(url) as probes: ...`` then ``probes.result``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Probes:
    """Runs this file as a child process for the duration of a ``with`` block."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self._args = [sys.executable, str(Path(__file__).resolve()), url, str(interval)]
        self._child: subprocess.Popen[str] | None = None
        self.result: dict[str, Any] = {"latencies": [], "errors": 0, "canary_lags": []}

    def __enter__(self) -> Probes:
        self._child = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._child.stdout.readline()  # type: ignore[union-attr]  # "ready": the probes run
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._child is not None
        out, _ = self._child.communicate(timeout=60)  # closes stdin: the child stops
        self.result = json.loads(out)


def _probe(url: str, interval: float, stop: threading.Event, result: dict[str, Any]) -> None:
    request = urllib.request.Request(url, headers={"Accept": ACCEPT})
    while not stop.is_set():
        started = time.monotonic()
        try:
            with _OPENER.open(request, timeout=30) as response:
                response.read()
            result["latencies"].append(time.monotonic() - started)
        except OSError:
            result["errors"] += 1
        stop.wait(interval)


async def _canary(stop: threading.Event, lags: list[float], interval: float = 0.1) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(max(time.perf_counter() - started - interval, 0.0))


def main() -> None:
    url, interval = sys.argv[1], float(sys.argv[2])
    stop = threading.Event()
    result: dict[str, Any] = {"latencies": [], "errors": 0, "canary_lags": []}
    prober = threading.Thread(target=_probe, args=(url, interval, stop, result), daemon=True)
    prober.start()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    asyncio.run(_canary(stop, result["canary_lags"]))
    prober.join()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
