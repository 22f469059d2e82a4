"""Manifests: by digest they are immutable and cached until evicted; a tag's digest is
trusted for ``tag_ttl``, then revalidated with a HEAD (Docker Hub does not count HEADs
against pull limits) and re-downloaded only when the digest moved. While the upstream is
down or rate-limiting, a known tag is served stale for up to ``max_stale``; a tag the
upstream said does not exist is remembered for ``negative_ttl``.

A fresh tag or a proven digest held in memory is answered inline (no task: the hot path
of a warm mirror). Concurrent misses and revalidations of the same manifest share one
upstream request. A stored manifest is
served by digest for a repository only with a proof that the repository holds it
(``proxy.registry.provenance``); a tag is the repository's own, so what it points at is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import structlog
from cachetools import LRUCache, TTLCache

from proxy.config.settings import CacheConfig
from proxy.errors import (
    DigestMismatch,
    ManifestUnknown,
    PullgateError,
    UpstreamDenied,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import MANIFEST_TYPES, UPSTREAM_ACCEPT, ParsedManifest, parse_manifest
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import Supervisor
from proxy.registry.catalog import Catalog
from proxy.registry.provenance import Provenance
from proxy.registry.routing import Route
from proxy.registry.store import BlobStore
from proxy.registry.upstream.client import RegistryClient, UpstreamResponse

_MEMORY_BYTES = 64 << 20  # manifests are small; keep the hot ones in memory
_NEGATIVE_MAX = 10_000  # "unknown tag" answers remembered


@dataclass(frozen=True, slots=True)
class Resolution:
    """A tag resolved to a digest, and whether the answer came from the cache (the
    admission webhook's ``ResolvedTag``)."""

    digest: Digest
    source: Literal["cache", "upstream"]


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: Digest
    media_type: str
    data: bytes
    result: str  # cache result: hit, miss, revalidated, stale


class ManifestCache:
    def __init__(
        self,
        store: BlobStore,
        catalog: Catalog,
        provenance: Provenance,
        upstreams: dict[str, RegistryClient],
        config: CacheConfig,
        metrics: Metrics,
        *,
        tasks: Supervisor,
        on_stored: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``tasks`` runs the index prefetches; ``on_stored``: something was added to the store."""
        self._store = store
        self._catalog = catalog
        self._provenance = provenance
        self._clock = clock
        self._upstreams = upstreams
        self._config = config
        self._metrics = metrics
        self._hits = metrics.cache_results.labels("manifest", "hit")  # the hot path's child
        # An LRU bounded by bytes held (getsizeof=len).
        self._memory: LRUCache[Digest, bytes] = LRUCache(maxsize=_MEMORY_BYTES, getsizeof=len)
        # "unknown tag" answers expire after negative_ttl (on the injected clock).
        self._negative: TTLCache[tuple[str, str, str], bool] = TTLCache(
            maxsize=_NEGATIVE_MAX, ttl=config.negative_ttl, timer=clock
        )
        self._inflight: dict[tuple[str, str, str], asyncio.Task[Manifest]] = {}
        self._log = structlog.get_logger("pullgate.manifests")
        self._on_stored = on_stored
        self._tasks = tasks

    async def get(self, route: Route, reference: str, *, count: bool = True) -> Manifest:
        """The manifest for a tag or digest (``reference`` already validated); ``count``
        records the cache result in the metrics (off for the mirror's own reads). Pulls are
        counted by the caller (``pulled``): a HEAD or an admission lookup is no pull."""
        key = (route.upstream, route.repository, reference)
        is_digest = Digest.looks_like(reference)
        task = self._inflight.get(key)
        if task is None:
            found = await (self._fresh_digest(route, Digest.parse(reference)) if is_digest else self._fresh_tag(key))
            if found is not None:  # answered from memory, as the slow path would have
                if count:
                    self._hits.inc()
                return found
            task = self._inflight.get(key)  # another request may have started it meanwhile
        if task is None:
            coro = self._by_digest(route, Digest.parse(reference)) if is_digest else self._by_tag(route, reference)
            task = asyncio.ensure_future(coro)
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            self._metrics.coalesced.labels("manifest").inc()
        manifest = await asyncio.shield(task)
        if count:
            self._metrics.cache_results.labels("manifest", manifest.result).inc()
        return manifest

    async def _fresh_digest(self, route: Route, digest: Digest) -> Manifest | None:
        """A hit without a task or the upstream: in memory, with a fresh proof that the
        route's repository holds it and its image row (what ``_by_digest`` would check);
        None sends the request the slow way."""
        data = self._memory.get(digest)
        if data is None:
            return None
        info = await self._catalog.manifest(digest)
        if info is None or not await self._provenance.proven(route, digest):
            return None
        if not await self._catalog.has_image(route.upstream, route.repository, digest):
            return None
        return Manifest(digest, info.media_type, data, "hit")

    async def _fresh_tag(self, key: tuple[str, str, str]) -> Manifest | None:
        """A hit without a task or the upstream: a tag checked within ``tag_ttl`` whose
        manifest is in memory (a remembered "unknown" goes the slow way, which raises)."""
        if key in self._negative:
            return None
        entry = await self._catalog.tag(*key)
        if entry is None or self._clock() - entry.checked >= self._config.tag_ttl:
            return None
        data = self._memory.get(entry.digest)
        info = await self._catalog.manifest(entry.digest) if data is not None else None
        if data is None or info is None:
            return None
        return Manifest(entry.digest, info.media_type, data, "hit")

    def pulled(self, route: Route, digest: Digest) -> None:
        """A client GET the manifest: count a pull (``cache ls``, eviction order)."""
        self._catalog.touch(route.upstream, route.repository, digest)

    # --- by digest ------------------------------------------------------------------------
    async def _by_digest(self, route: Route, digest: Digest) -> Manifest:
        cached = await self._cached(digest)
        if cached is None:
            response = await self._upstream(route, str(digest), "GET")
            return await self._store_manifest(route, response, digest, "miss")
        # Stored — perhaps for another repository: served here only if upstream showed
        # this repository holds it (ManifestUnknown otherwise).
        await self._provenance.establish(route, digest, lambda: self._upstream(route, str(digest), "HEAD"))
        if not await self._catalog.has_image(route.upstream, route.repository, digest):
            parsed = parse_manifest(cached[1], cached[0])
            proved = await self._catalog.proof(route.upstream, route.repository, digest) or 0.0
            await self._catalog.add_manifest(
                route.upstream, route.repository, digest, len(cached[1]), parsed, proved=proved
            )
        return Manifest(digest, cached[0], cached[1], "hit")

    # --- by tag -----------------------------------------------------------------------------
    async def _by_tag(self, route: Route, tag: str) -> Manifest:
        key = (route.upstream, route.repository, tag)
        if key in self._negative:
            self._metrics.cache_results.labels("tag", "negative").inc()
            raise ManifestUnknown(f"manifest {route.repository}:{tag} is unknown (cached answer)")
        entry = await self._catalog.tag(*key)
        cached = await self._cached(entry.digest) if entry is not None else None
        now = self._clock()
        if entry is not None and cached is not None and now - entry.checked < self._config.tag_ttl:
            return Manifest(entry.digest, cached[0], cached[1], "hit")
        try:
            if entry is not None and cached is not None:
                head = await self._upstream(route, tag, "HEAD")
                moved = head.headers.get("Docker-Content-Digest")
                if moved == str(entry.digest):
                    await self._catalog.set_tag(*key, entry.digest, now)
                    return Manifest(entry.digest, cached[0], cached[1], "revalidated")
            response = await self._upstream(route, tag, "GET")
        except ManifestUnknown:
            self._negative[key] = True
            raise
        except (UpstreamUnavailable, UpstreamRateLimited) as exc:
            if entry is None or cached is None or now - entry.checked > self._config.tag_ttl + self._config.max_stale:
                raise
            self._log.warning(
                "stale_tag_served",
                upstream=route.upstream,
                repository=route.repository,
                tag=tag,
                digest=str(entry.digest),
                age=round(now - entry.checked),
                error=exc.message,
            )
            return Manifest(entry.digest, cached[0], cached[1], "stale")
        claimed = response.headers.get("Docker-Content-Digest")
        manifest = await self._store_manifest(route, response, Digest.parse(claimed) if claimed else None, "miss")
        await self._catalog.set_tag(*key, manifest.digest, now)
        return manifest

    # --- upstream and storage ---------------------------------------------------------------
    async def _upstream(self, route: Route, reference: str, method: str) -> UpstreamResponse:
        client = self._upstreams[route.upstream]
        response = await client.fetch(
            method,
            route.repository,
            f"manifests/{reference}",
            headers={"Accept": UPSTREAM_ACCEPT},
            max_size=self._config.max_manifest_size,
        )
        if response.status == 404:
            raise ManifestUnknown(f"manifest {route.repository}:{reference} is unknown upstream")
        if response.status == 403:
            raise UpstreamDenied(f"upstream {route.upstream} denied access to {route.repository}")
        if response.status != 200:
            raise UpstreamError(f"upstream answered {response.status} for manifest {method}")
        return response

    async def _store_manifest(
        self, route: Route, response: UpstreamResponse, expected: Digest | None, result: str
    ) -> Manifest:
        """Verify a fetched manifest against the digest asked for (or claimed), then keep it."""
        algorithm = expected.algorithm if expected else "sha256"
        digest = Digest.of(response.body, algorithm)
        if expected is not None and digest != expected:
            self._metrics.digest_mismatches.labels(route.upstream, "manifest").inc()
            self._log.error(
                "digest_mismatch",
                upstream=route.upstream,
                repository=route.repository,
                expected=str(expected),
                actual=str(digest),
                kind="manifest",
            )
            raise DigestMismatch(f"upstream manifest does not match digest {expected}")
        parsed = parse_manifest(response.body, response.headers.get("Content-Type"))
        if self._store.size(digest) is None:
            await self._store.put(response.body, digest)
        # Fetched from this repository: the proof it holds the manifest. Durable before the
        # client hears of it (CatalogLocked, a 503, while another process holds the lock).
        await self._catalog.add_manifest(
            route.upstream, route.repository, digest, len(response.body), parsed, proved=self._clock()
        )
        self._remember(digest, response.body)
        self._on_stored()
        if parsed.is_index:
            self._prefetch(route, parsed)
        return Manifest(digest, parsed.media_type, response.body, result)

    def _prefetch(self, route: Route, index: ParsedManifest) -> None:
        """Cache every platform manifest of a new index in the background (they are small):
        a node of another architecture can then pull while the upstream is down."""
        for child in index.children:
            if child.media_type in MANIFEST_TYPES:
                self._tasks.start("manifest_prefetch", partial(self._prefetch_one, route, child.digest), restart=False)

    async def _prefetch_one(self, route: Route, digest: Digest) -> None:
        try:
            if not await self._catalog.has_image(route.upstream, route.repository, digest):
                await self.get(route, str(digest), count=False)
        except PullgateError as exc:  # a best-effort warm-up: the client's own request reports errors
            self._log.info(
                "manifest_prefetch_failed", repository=route.repository, digest=str(digest), error=exc.message
            )

    async def _cached(self, digest: Digest) -> tuple[str, bytes] | None:
        info = await self._catalog.manifest(digest)
        if info is None:
            return None
        data = self._memory.get(digest)
        if data is not None:
            return info.media_type, data
        data = await self._store.read(digest)
        if data is None:
            return None
        self._remember(digest, data)
        return info.media_type, data

    def _remember(self, digest: Digest, data: bytes) -> None:
        if digest not in self._memory and len(data) <= _MEMORY_BYTES:
            self._memory[digest] = data

    def forget(self, digest: Digest) -> None:
        """Drop a manifest from memory (eviction)."""
        self._memory.pop(digest, None)
