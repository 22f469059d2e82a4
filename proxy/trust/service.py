"""The one verification path the webhook and pull-time enforcement share: a per-rule
result cache, single flight, verification off the event loop, and one observer for
metrics and log events.

Each image is verified for the same candidate digests wherever it is asked about: its
own manifest digest and the indexes known to list it (a signature on a multi-arch index
covers its platform manifests). Results are cached by that digest for the life of the
rule (one policy version: a reload builds new rules, so a changed key set never reuses
old answers); concurrent askers for the same digest share one verification.

``proxy.trust`` imports no metrics or logging: callers inject a ``VerificationObserver``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import TLRUCache

from proxy.errors import PullgateError
from proxy.oci.digest import Digest
from proxy.singleflight import SingleFlight
from proxy.trust.verification import SignaturePolicy, SignatureSource, VerificationResult, verify_image


@dataclass(frozen=True, slots=True)
class Subject:
    """An image to verify: where its signature objects are, and which digests count."""

    source: SignatureSource
    repository: str
    digest: Digest
    related: Sequence[Digest] = ()  # indexes that list ``digest``

    @property
    def candidates(self) -> tuple[Digest, ...]:
        return tuple(dict.fromkeys((self.digest, *self.related)))

    def describe(self) -> str:
        return f"{self.repository}@{self.digest}"


class VerificationObserver(Protocol):
    """Where results go (metrics, log events); every method must be cheap and not raise."""

    def cache_lookup(self, hit: bool) -> None: ...

    def verified(self, subject: Subject, result: VerificationResult, seconds: float) -> None: ...

    def failed(self, subject: Subject, error: PullgateError) -> None: ...


class NullObserver:
    def cache_lookup(self, hit: bool) -> None:
        return None

    def verified(self, subject: Subject, result: VerificationResult, seconds: float) -> None:
        return None

    def failed(self, subject: Subject, error: PullgateError) -> None:
        return None


class VerificationCache:
    """Results by image digest for one rule. Successes are trusted for ``ttl``, failures
    only for ``failure_ttl`` so a freshly pushed signature is seen soon. Keyed by digest,
    so a tag moved to an unsigned image is verified afresh. At most ``max_entries``: the
    least recently used result goes first (cachetools' time-aware LRU, so a full cache
    never forgets everything at once). Also holds the verifications in flight
    (``proxy.singleflight``), so concurrent askers (webhook and pulls alike) share one."""

    def __init__(
        self,
        ttl: float = 600.0,
        failure_ttl: float = 30.0,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self._entries: TLRUCache[Digest, VerificationResult] = TLRUCache(
            maxsize=max_entries, ttu=self._expiry, timer=clock
        )
        self._inflight: SingleFlight[Digest, VerificationResult] = SingleFlight()

    def _expiry(self, _: Digest, result: VerificationResult, now: float) -> float:
        return now + (self.ttl if result.allowed else self.failure_ttl)

    def get(self, digest: Digest) -> VerificationResult | None:
        return self._entries.get(digest)

    def put(self, digest: Digest, result: VerificationResult) -> None:
        self._entries[digest] = result

    async def shared(
        self, digest: Digest, verify: Callable[[], Coroutine[Any, Any, VerificationResult]]
    ) -> VerificationResult:
        """``verify()`` once for concurrent askers of ``digest``. Shielded: one asker giving
        up (its request timed out) does not cancel the verification the others wait for."""
        return await self._inflight.run(digest, verify)


class VerificationService:
    def __init__(self, observer: VerificationObserver | None = None) -> None:
        self.observer: VerificationObserver = observer or NullObserver()

    async def verify(self, subject: Subject, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        """The cached result for ``subject.digest``, or one verification shared by every
        concurrent asker. Errors of the source (``PullgateError``) propagate."""
        cached = cache.get(subject.digest)
        self.observer.cache_lookup(cached is not None)
        if cached is not None:
            return cached
        return await cache.shared(subject.digest, lambda: self._run(subject, policy, cache))

    async def _run(self, subject: Subject, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        started = time.perf_counter()
        try:
            result = await verify_image(subject.source, subject.repository, subject.candidates, policy)
        except PullgateError as exc:
            self.observer.failed(subject, exc)
            raise
        cache.put(subject.digest, result)
        self.observer.verified(subject, result, time.perf_counter() - started)
        return result
