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

Several replicas (``proxy.registry.sharedstate``): what one learns from the upstream — the
manifest (object store), its proof and the tag's digest with its check time (Redis) — is
published in the background. A replica without a fresh answer of its own asks them before
the upstream: a tag another replica checked within ``tag_ttl`` is answered from there (and a
staler one may serve while the upstream is down), a manifest by digest is read from the
object store (verified) and served with a proof — so a cluster asks Docker Hub for each
manifest once, not once per replica. Negative answers stay local.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
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
from proxy.registry.catalog import Catalog, TagEntry
from proxy.registry.cluster import Cluster
from proxy.registry.provenance import Provenance
from proxy.registry.routing import Route
from proxy.registry.sharedstate import SharedState, sniff
from proxy.registry.store import BlobStore
from proxy.registry.upstream.client import RegistryClient, UpstreamResponse

_MEMORY_BYTES = 64 << 20  # manifests are small; keep the hot ones in memory
_NEGATIVE_MAX = 10_000  # "unknown tag" answers remembered
# ``peek``: the fast path's answers reused for at most this long without looking again.
_HOT_SECONDS = 1.0
_HOT_ENTRIES, _HOT_BYTES = 1024, 16 << 20


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
        cluster: Cluster | None = None,
    ) -> None:
        """``tasks`` runs the index prefetches and what is shared with the other replicas;
        ``on_stored``: something was added to the store; ``cluster``: the object store and
        Redis shared with the other replicas, when configured."""
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
        # The fast path's answers by (upstream, repository, reference), each with the time it
        # stops being fresh: ``peek`` answers them without awaiting anything.
        self._hot: dict[tuple[str, str, str], tuple[Manifest, float]] = {}
        self._hot_bytes = 0
        self._log = structlog.get_logger("pullgate.manifests")
        self._on_stored = on_stored
        self._tasks = tasks
        self._shared = SharedState(cluster)

    def peek(self, route: Route, reference: str) -> Manifest | None:
        """What ``get`` answered from memory for this (route, reference) — a fresh tag or a
        proven digest, checked as ``get`` checks them within the last ``_HOT_SECONDS`` and
        still fresh — without awaiting; counted as a hit. None: ask ``get``. A reference
        found here was validated when it was first answered."""
        hot = self._hot.get((route.upstream, route.repository, reference))
        if hot is None or self._clock() >= hot[1]:
            return None
        self._hits.inc()
        return hot[0]

    def _keep_hot(self, key: tuple[str, str, str], manifest: Manifest, fresh_until: float) -> None:
        old = self._hot.pop(key, None)
        self._hot_bytes -= len(old[0].data) if old is not None else 0
        if len(self._hot) >= _HOT_ENTRIES or self._hot_bytes + len(manifest.data) > _HOT_BYTES:
            self._hot.clear()  # bounded by emptying: it refills from the next requests
            self._hot_bytes = 0
        self._hot[key] = (manifest, min(fresh_until, self._clock() + _HOT_SECONDS))
        self._hot_bytes += len(manifest.data)

    async def get(self, route: Route, reference: str, *, count: bool = True) -> Manifest:
        """The manifest for a tag or digest (``reference`` already validated); ``count``
        records the cache result in the metrics (off for the mirror's own reads). Pulls are
        counted by the caller (``pulled``): a HEAD or an admission lookup is no pull."""
        key = (route.upstream, route.repository, reference)
        is_digest = Digest.looks_like(reference)
        task = self._inflight.get(key)
        if task is None:
            fresh = self._fresh_digest(route, key, Digest.parse(reference)) if is_digest else self._fresh_tag(key)
            found = await fresh
            if found is not None:  # answered from memory, as the slow path would have
                if count:
                    self._hits.inc()
                return found
            task = self._inflight.get(key)  # another request may have started it meanwhile
        if task is None:
            self._hot.pop(key, None)  # the slow way decides now (e.g. a tag just found unknown)
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

    async def _fresh_digest(self, route: Route, key: tuple[str, str, str], digest: Digest) -> Manifest | None:
        """A hit without a task or the upstream: in memory, with a fresh proof that the
        route's repository holds it and its image row (what ``_by_digest`` would check);
        None sends the request the slow way."""
        data = self._memory.get(digest)
        if data is None:
            return None
        info = await self._catalog.manifest(digest)
        proven_until = await self._provenance.proven_until(route, digest) if info is not None else None
        if info is None or proven_until is None:
            return None
        if not await self._catalog.has_image(route.upstream, route.repository, digest):
            return None
        manifest = Manifest(digest, info.media_type, data, "hit")
        self._keep_hot(key, manifest, proven_until)
        return manifest

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
        manifest = Manifest(entry.digest, info.media_type, data, "hit")
        self._keep_hot(key, manifest, entry.checked + self._config.tag_ttl)
        return manifest

    def pulled(self, route: Route, digest: Digest) -> None:
        """A client GET the manifest: count a pull (``cache ls``, eviction order)."""
        self._catalog.touch(route.upstream, route.repository, digest)

    # --- by digest ------------------------------------------------------------------------
    async def _by_digest(self, route: Route, digest: Digest) -> Manifest:
        cached = await self._cached(digest)
        if cached is None:
            shared = await self._from_object_store(route, digest)
            if shared is not None:
                return shared
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
        # No fresh answer here: perhaps another replica checked the tag more recently.
        shared = await self._shared_tag(route, tag, entry if cached is not None else None)
        if shared is not None:
            entry, cached = shared
            if now - entry.checked < self._config.tag_ttl:
                await self._catalog.set_tag(*key, entry.digest, entry.checked)
                return Manifest(entry.digest, cached[0], cached[1], "hit")
        try:
            if entry is not None and cached is not None:
                head = await self._upstream(route, tag, "HEAD")
                moved = head.headers.get("Docker-Content-Digest")
                if moved == str(entry.digest):
                    await self._catalog.set_tag(*key, entry.digest, now)
                    self._publish(partial(self._share_tag, route, tag, entry.digest, now))
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
        manifest = await self._store_manifest(
            route, response, Digest.parse(claimed) if claimed else None, "miss", tag=tag, checked=now
        )
        await self._catalog.set_tag(*key, manifest.digest, now)
        return manifest

    async def _shared_tag(
        self, route: Route, tag: str, local: TagEntry | None
    ) -> tuple[TagEntry, tuple[str, bytes]] | None:
        """The tag as another replica last saw it (Redis), if more recent than ``local``,
        with its manifest from the local store or the object store (no upstream request)."""
        record = await self._shared.tag(route.upstream, route.repository, tag)
        if record is None or (local is not None and record.checked <= local.checked):
            return None
        checked = min(record.checked, self._clock())  # a clock ahead of ours earns no extra life
        # The upstream showed the tag in this repository: what it names is the repository's own.
        found = await self._load(route, record.digest, checked)
        return None if found is None else (TagEntry(record.digest, checked), found)

    async def _load(self, route: Route, digest: Digest, proved: float) -> tuple[str, bytes] | None:
        """(media type, bytes) of a manifest ``route`` is known to hold (shown at ``proved``),
        from the local store or the object store; None when neither has it."""
        cached = await self._cached(digest)
        if cached is not None:
            if not await self._catalog.has_image(route.upstream, route.repository, digest):
                parsed = parse_manifest(cached[1], cached[0])
                await self._catalog.add_manifest(
                    route.upstream, route.repository, digest, len(cached[1]), parsed, proved=proved
                )
            return cached
        found = await self._object_store_manifest(digest)
        if found is None:
            return None
        await self._keep(route, digest, *found, proved)
        return found[1].media_type, found[0]

    async def _from_object_store(self, route: Route, digest: Digest) -> Manifest | None:
        """A manifest another replica stored in the object store, served here with a proof
        that the route's repository holds it (from this replica, Redis, or an upstream HEAD —
        which Docker Hub does not count as a pull, as it does a GET)."""
        found = await self._object_store_manifest(digest)
        if found is None:
            return None
        await self._provenance.establish(route, digest, lambda: self._upstream(route, str(digest), "HEAD"))
        proved = await self._catalog.proof(route.upstream, route.repository, digest) or self._clock()
        await self._keep(route, digest, *found, proved)
        return Manifest(digest, found[1].media_type, found[0], "hit")

    async def _object_store_manifest(self, digest: Digest) -> tuple[bytes, ParsedManifest] | None:
        """Verified bytes of ``digest`` from the object store, parsed from themselves alone."""
        data = await self._shared.manifest(digest, self._config.max_manifest_size)
        parsed = sniff(data) if data is not None else None
        return None if data is None or parsed is None else (data, parsed)

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
        self,
        route: Route,
        response: UpstreamResponse,
        expected: Digest | None,
        result: str,
        *,
        tag: str | None = None,
        checked: float | None = None,
    ) -> Manifest:
        """Verify a fetched manifest against the digest asked for (or claimed), keep it, and
        share it with the other replicas (with ``tag`` as checked at ``checked``)."""
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
        proved = self._clock()
        # Fetched from this repository: the proof it holds the manifest.
        await self._keep(route, digest, response.body, parsed, proved)
        self._publish(partial(self._share_manifest, route, digest, response.body, parsed, proved, tag, checked))
        return Manifest(digest, parsed.media_type, response.body, result)

    async def _keep(self, route: Route, digest: Digest, data: bytes, parsed: ParsedManifest, proved: float) -> None:
        """Store verified manifest bytes of ``route``'s repository (shown to hold them at
        ``proved``) in the local tier."""
        if self._store.size(digest) is None:
            await self._store.put(data, digest)
        # Durable before the client hears of it (CatalogLocked, a 503, while another process
        # holds the lock).
        await self._catalog.add_manifest(route.upstream, route.repository, digest, len(data), parsed, proved=proved)
        self._remember(digest, data)
        self._on_stored()
        if parsed.is_index:
            self._prefetch(route, parsed)

    # --- sharing with the other replicas ----------------------------------------------------
    def _publish(self, job: Callable[[], Awaitable[None]]) -> None:
        """Share in the background: the client does not wait for Redis or the object store."""
        self._shared.publish(self._tasks, job)

    async def published(self) -> None:
        """Wait until what this replica learned so far is shared (tests, benchmarks)."""
        await self._shared.published()

    async def _share_manifest(
        self,
        route: Route,
        digest: Digest,
        data: bytes,
        parsed: ParsedManifest,
        proved: float,
        tag: str | None,
        checked: float | None,
    ) -> None:
        """The object store first, then the proof and the tag in Redis: a replica that reads
        the tag finds the manifest without asking the upstream."""
        await self._shared.put_manifest(digest, data, parsed.media_type)
        await self._provenance.announce(route, digest, proved)
        if tag is not None and checked is not None:
            await self._share_tag(route, tag, digest, checked)

    async def _share_tag(self, route: Route, tag: str, digest: Digest, checked: float) -> None:
        # Kept as long as a replica may still serve it (stale, while the upstream is down).
        ttl = self._config.tag_ttl + self._config.max_stale - (self._clock() - checked)
        await self._shared.set_tag(route.upstream, route.repository, tag, digest, checked=checked, ttl=ttl)

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
        self._hot.clear()
        self._hot_bytes = 0
