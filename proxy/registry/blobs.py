"""Blobs: served from the store when present, else fetched from upstream once (single
flight) while every waiting client streams the bytes as they arrive.

A stored blob is served for a repository only with a proof that the repository holds it
(``proxy.registry.provenance``): blobs are scoped to repositories (distribution spec), the
store is shared, and one repository's digests must not leak through another's name.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
import structlog

from proxy.errors import BlobUnknown, DigestMismatch, PullgateError, UpstreamError, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.ops.metrics import Metrics
from proxy.registry.catalog import Catalog
from proxy.registry.cluster import Cluster
from proxy.registry.download import Flight, State
from proxy.registry.provenance import Provenance
from proxy.registry.routing import Route
from proxy.registry.sharing import Sharing
from proxy.registry.sources import BlobSource, PeerSource, SourceFailed, UpstreamSource
from proxy.registry.store import BlobStore
from proxy.registry.upstream.client import RegistryClient, describe_error

_START_TIMEOUT = 60.0
_WRITE_BEHIND = 4 << 20  # bytes received while a write runs before the download waits for it
_MAX_SOURCES = 6  # sources one download tries (each failure mid-way resumes in the next)
_RETRY_PAUSE = 0.2


@dataclass(frozen=True, slots=True)
class CachedBlob:
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int | None


class BlobService:
    def __init__(
        self,
        store: BlobStore,
        catalog: Catalog,
        provenance: Provenance,
        upstreams: dict[str, RegistryClient],
        metrics: Metrics,
        *,
        cluster: Cluster | None = None,
        session: aiohttp.ClientSession | None = None,
        on_stored: Callable[[], None] = lambda: None,
        on_full: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_stored``: something was added to the store; ``on_full``: the disk is full,
        evict now."""
        self._store = store
        self._catalog = catalog
        self._provenance = provenance
        self._upstreams = upstreams
        self._metrics = metrics
        # The cluster side (object store, peers), when blobs are shared with other replicas.
        self._sharing = Sharing(cluster, session, metrics) if cluster is not None and session is not None else None
        self._flights: dict[Digest, Flight] = {}
        self._sources: dict[Digest, Route] = {}  # whose request started each download
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_stored = on_stored
        self._on_full = on_full
        self._log = structlog.get_logger("pullgate.blobs")

    async def get(self, route: Route, digest: Digest) -> CachedBlob | Flight:
        """The cached blob, or the download to stream from (joined or started)."""
        # A download is looked up first: while it commits, its file appears in the store
        # before its proof is recorded.
        flight = self._flights.get(digest)
        size = self._store.size(digest) if flight is None else None
        if size is not None:
            await self._authorize(route, digest)
            self._metrics.cache_results.labels("blob", "hit").inc()
            return CachedBlob(digest, size)
        if flight is not None:
            if self._sources.get(digest) != route:  # a GET from this very repository is on its way
                await self._authorize(route, digest)
            self._metrics.cache_results.labels("blob", "coalesced").inc()
            self._metrics.coalesced.labels("blob").inc()
        else:
            self._metrics.cache_results.labels("blob", "miss").inc()
            flight = self._start(route, digest)
        async with asyncio.timeout(_START_TIMEOUT):
            await asyncio.shield(flight.started)
        return flight

    async def redirect(self, route: Route, digest: Digest) -> str | None:
        """Where to send a GET of ``digest`` with ``storage.redirect`` on: a presigned URL of
        the object store's copy, given only after ``route`` is proven to hold the blob
        (BlobUnknown otherwise). None: serve it here with ``get`` (redirects off, the blob
        not in the object store yet, or the store down)."""
        if self._sharing is None:
            return None
        url = await self._sharing.presigned(digest, lambda: self._authorize(route, digest))
        if url is not None:
            self._metrics.cache_results.labels("blob", "redirect").inc()
        return url

    async def head(self, route: Route, digest: Digest) -> BlobInfo:
        flight = self._flights.get(digest)
        if flight is not None and flight.size is not None and self._sources.get(digest) == route:
            return BlobInfo(digest, flight.size)
        size = self._store.size(digest)
        if size is not None:
            await self._authorize(route, digest)
            return BlobInfo(digest, size)
        # Not cached: ask upstream rather than answer 404 (the client will GET it next).
        length = await self._head(route, digest)
        await self._provenance.record(route, digest)
        return BlobInfo(digest, length)

    async def _authorize(self, route: Route, digest: Digest) -> None:
        await self._provenance.establish(route, digest, lambda: self._head(route, digest))

    async def _head(self, route: Route, digest: Digest) -> int | None:
        """HEAD the blob upstream under this repository: its length, or BlobUnknown."""
        client = self._upstreams[route.upstream]
        response = await client.fetch("HEAD", route.repository, f"blobs/{digest}", max_size=0)
        if response.status == 404:
            raise BlobUnknown(f"blob {digest} is unknown to repository {route.repository}")
        if response.status != 200:
            raise UpstreamError(f"upstream answered {response.status} for blob HEAD")
        length = response.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    # --- downloads ------------------------------------------------------------------------
    def _start(self, route: Route, digest: Digest) -> Flight:
        flight = Flight(digest, self._store.temp_path())
        self._flights[digest] = flight
        self._sources[digest] = route
        # The download is its own task: a client that disconnects must not cancel it.
        task = asyncio.create_task(self._download(route, flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def _download(self, route: Route, flight: Flight) -> None:
        log = self._log.bind(upstream=route.upstream, repository=route.repository, digest=str(flight.digest))
        self._metrics.inflight_fetches.inc()
        try:
            await flight.create()
            await self._fill(route, flight)
            await self._keep(route, flight)
        except PullgateError as exc:
            flight.fail(exc)
            log.warning("blob_fetch_failed", error=exc.message, code=exc.code)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.upstream_errors.labels(route.upstream, "read").inc()
            flight.fail(UpstreamUnavailable(f"upstream transfer failed: {exc.__class__.__name__}"))
            log.warning("blob_fetch_failed", error=describe_error(exc), code="UNAVAILABLE")
        except OSError as exc:
            flight.fail(UpstreamUnavailable(f"cache write failed: {errno.errorcode.get(exc.errno or 0, exc)}"))
            log.error("blob_store_failed", error=repr(exc))
        finally:
            if flight.state is State.RUNNING:  # cancelled (shutdown)
                flight.fail(UpstreamUnavailable("download cancelled"))
            self._metrics.inflight_fetches.dec()
            if self._flights.get(flight.digest) is flight:
                del self._flights[flight.digest]
                del self._sources[flight.digest]
            flight.writer_closed()
            if flight.final is None:
                await asyncio.to_thread(flight.temp.unlink, missing_ok=True)

    async def _fill(self, route: Route, flight: Flight) -> None:
        """Receive every byte of the blob and verify it. A shared source (object store,
        peer) that fails mid-way is followed by the next one from the offset reached."""
        client = self._upstreams[route.upstream]
        hasher = flight.digest.hasher()
        dead: set[str] = set()  # peers (advertised URLs) that failed this download
        used: set[str] = set()  # names of the sources that gave bytes
        for attempt in range(_MAX_SOURCES):
            # The last attempt goes to the upstream alone, whatever the cluster says.
            alone = attempt == _MAX_SOURCES - 1
            source = await self._choose(client, route, flight, dead, alone=alone)
            offset = flight.written
            used.add(source.name)
            try:
                async with source.open(flight.written) as body:
                    if not flight.started.done():
                        flight.begin(body.size)
                    elif body.size is not None and flight.size is not None and body.size != flight.size:
                        raise SourceFailed(f"{source.name} gave size {body.size}, expected {flight.size}")
                    await self._receive(flight, body.chunks, hasher.update)
            except SourceFailed as exc:
                self._log.warning(
                    "blob_source_failed", digest=str(flight.digest), source=source.name,
                    offset=flight.written, error=exc.message,
                )  # fmt: skip
                if isinstance(source, PeerSource):
                    if exc.gone:
                        dead.add(source.base)
                    else:  # the holder has nothing to stream yet (or any more): look again shortly
                        await asyncio.sleep(_RETRY_PAUSE)
                continue
            self._metrics.shared_tier.labels(source.name).inc()
            if source.name == "upstream":
                self._metrics.upstream_bytes.labels(route.upstream).inc(flight.written - offset)
            break
        else:
            raise UpstreamUnavailable(f"no source delivered blob {flight.digest}")
        try:
            self._verify(route, flight, hasher.hexdigest())
        except DigestMismatch:
            if "object_store" in used and self._sharing is not None:
                # Only verified uploads become objects: someone else wrote this one. Remove
                # it, so the next download fetches the blob again instead of failing forever.
                await self._sharing.discard(flight.digest)
            raise

    async def _choose(
        self, client: RegistryClient, route: Route, flight: Flight, dead: set[str], *, alone: bool
    ) -> BlobSource:
        if self._sharing is None:
            return UpstreamSource(client, route, flight.digest)
        authorize = partial(self._authorize, route, flight.digest)
        return await self._sharing.choose(client, route, flight, dead, authorize, alone=alone)

    def _verify(self, route: Route, flight: Flight, actual: str) -> None:
        if flight.size is not None and flight.written != flight.size:
            self._metrics.upstream_errors.labels(route.upstream, "short_read").inc()
            raise UpstreamUnavailable(f"upstream sent {flight.written} of {flight.size} bytes")
        if not flight.digest.matches(actual):
            self._metrics.digest_mismatches.labels(route.upstream, "blob").inc()
            self._log.error(
                "digest_mismatch",
                upstream=route.upstream,
                repository=route.repository,
                expected=str(flight.digest),
                actual=f"{flight.digest.algorithm}:{actual}",
            )
            raise DigestMismatch(f"upstream content for {flight.digest} does not match its digest")
        # Verified: readers may have the last byte now, while the file is made durable
        # (fsync, rename) for later clients — a client never waits for the disk flush.
        flight.verified()

    async def _keep(self, route: Route, flight: Flight) -> None:
        """Commit a verified download to the store — unless the disk filled, in which case
        the clients got their bytes straight through and nothing is cached."""
        log = self._log.bind(upstream=route.upstream, repository=route.repository, digest=str(flight.digest))
        if not flight.spilled:
            try:
                flight.final = await self._store.commit(flight.temp, flight.digest, flight.fd)
            except OSError as exc:
                log.error("blob_store_failed", error=repr(exc))
        if flight.final is None:
            flight.finish()
            log.warning("blob_passed_through", size=flight.written, reason="cache disk full")
            self._on_full()
            return
        await self._catalog.add_blob(flight.digest, flight.written)
        await self._provenance.record(route, flight.digest)  # fetched from this repository
        flight.finish()
        log.info("blob_cached", size=flight.written)
        self._on_stored()

    async def _receive(self, flight: Flight, chunks: AsyncIterator[bytes], update: Callable[[bytes], object]) -> None:
        # Bytes are written (and hashed) in a worker thread while the next ones arrive; what
        # arrives meanwhile is written in one go next (at most _WRITE_BEHIND bytes wait).
        writing: asyncio.Future[None] | None = None
        pending: list[bytes] = []
        waiting = 0
        try:
            async for chunk in chunks:
                pending.append(chunk)
                waiting += len(chunk)
                if writing is None or writing.done() or waiting >= _WRITE_BEHIND:
                    writing = await self._write_next(flight, writing, pending, update)
                    pending, waiting = [], 0
                if flight.size is not None and flight.written + waiting > flight.size:
                    break
            writing = await self._write_next(flight, writing, pending, update)
            await self._write_next(flight, writing, [], update)
        finally:
            # The descriptor must outlive a write still running in its thread.
            if writing is not None and not writing.done():
                await asyncio.wait([writing])
            if writing is not None and writing.done() and not writing.cancelled():
                writing.exception()  # retrieved: the error that matters is already propagating

    async def _write_next(
        self,
        flight: Flight,
        writing: asyncio.Future[None] | None,
        pending: list[bytes],
        update: Callable[[bytes], object],
    ) -> asyncio.Future[None] | None:
        """Wait for the write in progress, then start writing ``pending`` (if any)."""
        if writing is not None:
            await writing
            self._check_spill(flight)
        if not pending:
            return None
        return asyncio.ensure_future(flight.write(pending, update))  # pieces: no join on the loop

    def _check_spill(self, flight: Flight) -> None:
        if flight.spilled and self._flights.get(flight.digest) is flight:
            # New clients must not join a download that keeps only a memory window.
            del self._flights[flight.digest]
            del self._sources[flight.digest]
            self._log.error("cache_disk_full", digest=str(flight.digest), on_disk=flight.disk_bytes)
            self._on_full()

    def in_flight(self) -> list[Digest]:
        return list(self._flights)

    def local(self, digest: Digest) -> CachedBlob | Flight | None:
        """What this replica has of ``digest`` without asking anyone: the download running
        here (maybe still connecting: wait for ``started``), or the blob on local disk (the
        peer endpoint serves these to other replicas)."""
        flight = self._flights.get(digest)
        if flight is not None and not (flight.started.done() and flight.started.exception()):
            return flight
        size = self._store.size(digest)
        return CachedBlob(digest, size) if size is not None else None

    async def close(self, grace: float) -> None:
        """Let running downloads finish within ``grace`` seconds (they are cached for the
        next start), then cancel the rest: their temp files are removed. Uploads to the
        object store follow."""
        await self._close_downloads(grace)
        if self._sharing is not None:
            await self._sharing.close()

    async def _close_downloads(self, grace: float) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
