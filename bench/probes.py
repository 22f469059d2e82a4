#!/usr/bin/env python3
"""Latency probes for a load benchmark, in processes of their own.

A manifest prober in the benchmark's own process measures that process: with 200 client
threads reading bodies, a probe thread waits for the GIL for hundreds of milliseconds
(first full storm run: manifest p99 607 ms, most of it spent before the request left).
So, with stdin as the stop signal (the benchmark closes it), two child processes run:

  * ``manifest``: GETs ``url`` every ``interval`` seconds on its own connection, at a raised
    CPU priority (nice -10, where allowed — on a cluster the prober and the pulling nodes
    are different machines; here they share 2 cores with 200 busy client threads, and the
    probe's own wait for a core would be counted as pullgate's latency);
  * ``canary``: a bare asyncio loop at normal priority that sleeps 100 ms and records how
    late it wakes up — the same measurement as ``pullgate_event_loop_lag_seconds``, for a
    loop that does nothing: what the machine's CPU scheduling alone does to an event loop
    under this load (the floor pullgate's own lag is read against).

Each prints one JSON object when stopped. As a library: ``with Probes(url) as probes: ...``,
then ``probes.result``: ``latencies``, ``errors``, ``nice`` (the prober's), ``canary_lags``
(seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
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
    """Runs the two probes as child processes for the duration of a ``with`` block."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        me = [sys.executable, str(Path(__file__).resolve())]
        self._commands = {"manifest": [*me, "manifest", url, str(interval)], "canary": [*me, "canary"]}
        self._children: dict[str, subprocess.Popen[str]] = {}
        self.result: dict[str, Any] = {"latencies": [], "errors": 0, "nice": 0, "canary_lags": []}

    def __enter__(self) -> Probes:
        for name, command in self._commands.items():
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self._children[name] = child
            child.stdout.readline()  # type: ignore[union-attr]  # "ready": the probe runs
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self._children.values():
            out, _ = child.communicate(timeout=60)  # closes stdin: the child stops
            self.result.update(json.loads(out))


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


def _until_stdin_closes() -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    return stop


def main() -> None:
    stop = _until_stdin_closes()
    if sys.argv[1] == "canary":
        lags: list[float] = []
        print("ready", flush=True)
        asyncio.run(_canary(stop, lags))
        print(json.dumps({"canary_lags": lags}))
        return
    url, interval = sys.argv[2], float(sys.argv[3])
    result: dict[str, Any] = {"latencies": [], "errors": 0, "nice": 0}
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        result["nice"] = -10
    except PermissionError:  # not root: the probe competes with the clients like they do
        pass
    print("ready", flush=True)
    _probe(url, interval, stop, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
