"""Concurrency and rate limits that keep one client (or a crowd) from exhausting the mirror:
concurrent upstream fetches, overall and per client address, failed logins per address, and
concurrent password checks per address and per user.

The client a fetch is charged to travels in a ``ContextVar`` (``FETCH_CLIENT``): the route
handler sets it, and the download and manifest tasks it starts inherit it (asyncio copies
the context into every task it creates), so the cache code in between needs no new
parameters. The variable holds no shared state: each request's task has its own value.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import NoReturn

from proxy.errors import PullgateError, UpstreamRateLimited
from proxy.ops.metrics import Metrics

FETCH_CLIENT: ContextVar[str | None] = ContextVar("pullgate_fetch_client", default=None)
_RETRY_AFTER = "1"
_MAX_TRACKED = 65_536  # addresses remembered by the failed-login window


class TooManyRequests(PullgateError):
    code, status = "TOOMANYREQUESTS", 429


class FetchLimitReached(UpstreamRateLimited):
    """Too many concurrent upstream fetches. An ``UpstreamRateLimited``, so a known tag is
    still served stale meanwhile; clients see ``429`` + ``Retry-After`` and retry (containerd
    does), instead of queueing without bound."""


@lru_cache(maxsize=4096)
def client_key(remote: str | None) -> str:
    """The unit limits count per: the IPv4 address, or the IPv6 /64 (one host's share of
    addresses — rotating through it must not reset a limit). Memoized: parsing the address
    is a measurable share of a warm request, and a pure function of the string."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FetchLimiter:
    """Counts upstream fetches in progress; a fetch over either limit is refused at once."""

    def __init__(self, total: int, per_client: int, metrics: Metrics) -> None:
        self._total = total
        self._per_client = per_client
        self._metrics = metrics
        self._active = 0
        self._by_client: dict[str, int] = {}

    @contextmanager
    def permit(self) -> Iterator[None]:
        client = FETCH_CLIENT.get()
        if self._active >= self._total:
            self._reject("overall")
        if client is not None and self._by_client.get(client, 0) >= self._per_client:
            self._reject("client")
        self._active += 1
        if client is not None:
            self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            yield
        finally:
            self._active -= 1
            if client is not None:
                left = self._by_client[client] - 1
                if left:
                    self._by_client[client] = left
                else:
                    del self._by_client[client]

    def _reject(self, scope: str) -> NoReturn:
        self._metrics.fetch_limit_rejections.labels(scope).inc()
        raise FetchLimitReached(
            f"too many concurrent upstream fetches ({scope} limit); retry shortly",
            headers={"Retry-After": _RETRY_AFTER},
        )

    @property
    def active(self) -> int:
        return self._active


class FailureWindow:
    """Failures per key in a sliding window: ``limit`` within ``window`` seconds, then the
    key is refused until its oldest failure ages out.

    A guess counts from the moment it starts (``begin``), not when its slow check ends:
    otherwise a burst of concurrent guesses all pass the check before the first failure is
    recorded (issue 13: 150 parallel logins against a limit of 10 got 150 guesses). Attempts
    in flight and failures in the window together never exceed ``limit``."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self._limit = limit
        self._window = window
        self._failures: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again after ``limit`` failures; 0 when it may now."""
        failures = self._failures.get(key)
        if failures is None:
            return 0.0
        now = time.monotonic()
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return 0.0
        if len(failures) < self._limit:
            return 0.0
        return max(failures[0] + self._window - now, 0.001)

    def record(self, key: str) -> None:
        failures = self._failures.pop(key, None) or deque(maxlen=self._limit)
        failures.append(time.monotonic())
        self._failures[key] = failures  # re-inserted: the dict stays in order of last failure
        while len(self._failures) > _MAX_TRACKED:
            del self._failures[next(iter(self._failures))]

    @contextmanager
    def begin(self, key: str) -> Iterator[Attempt]:
        """One attempt, counted while it runs; a failed one stays in the window (``Attempt.failed``).
        ``TooManyRequests`` when failures plus attempts in flight already reach the limit."""
        wait = self.retry_after(key)
        in_flight = self._in_flight.get(key, 0)
        if wait or len(self._failures.get(key, ())) + in_flight >= self._limit:
            retry = str(int(wait) + 1) if wait else _RETRY_AFTER
            raise TooManyRequests("too many failed logins; retry later", headers={"Retry-After": retry})
        self._in_flight[key] = in_flight + 1
        attempt = Attempt()
        try:
            yield attempt
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
            if attempt.failure:
                self.record(key)


class Attempt:
    """An attempt under way (``FailureWindow.begin``); ``failed()`` before it ends counts it."""

    failure = False

    def failed(self) -> None:
        self.failure = True


class KeyedSlots:
    """At most ``limit`` holders per key at once; one more is refused at once with ``429``
    (never queued, so waiting costs the mirror nothing)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: dict[str, int] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        held = self._held.get(key, 0)
        if held >= self._limit:
            raise TooManyRequests("too many concurrent logins; retry shortly", headers={"Retry-After": _RETRY_AFTER})
        self._held[key] = held + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]

    def held(self, key: str) -> int:
        return self._held.get(key, 0)
