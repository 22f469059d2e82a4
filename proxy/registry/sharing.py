"""Which source a replica downloads a blob from, and how what it downloads from upstream
reaches the other replicas.

One replica in the cluster fetches a blob from upstream: the one that takes the Redis lease
``blob:<digest>`` (``proxy.registry.coordination``). It serves its own clients as bytes
arrive and uploads the blob to the object store; the lease is released when the object is
there (or the upload failed). The other replicas stream the bytes from the holder's peer
endpoint while it downloads (their clients' first byte stays fast), or read the object
store once it is there. A holder that dies stops answering: its peers resume from upstream
at the offset they reached, without waiting for its lease to expire.

Without Redis (not configured, or down) every replica works alone: it reads the object
store when the blob is there and downloads from upstream otherwise, uploading what it got
(two replicas storing one blob is harmless: objects are content-addressed and only a
verified upload becomes visible, ``proxy.registry.objectupload``).

A blob read from the object store or a peer was fetched for *some* repository; the
requesting repository is proven to hold it first (``proxy.registry.provenance``), as for a
blob on local disk.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine

import aiohttp
import structlog

from proxy.errors import PullgateError
from proxy.oci.digest import Digest
from proxy.ops.metrics import Metrics
from proxy.registry.cluster import Cluster
from proxy.registry.coordination import CoordinationUnavailable, Coordinator, Lease
from proxy.registry.download import Flight
from proxy.registry.routing import Route
from proxy.registry.s3client import StorageUnavailable
from proxy.registry.sources import BlobSource, ObjectSource, PeerSource, UpstreamSource
from proxy.registry.upstream.client import RegistryClient

_POLL = 0.2  # seconds between looks at a lease whose holder cannot be streamed from
_UPLOAD_GRACE = 60.0  # an upload still running at shutdown is given this long

# Proves the requesting repository holds the blob (raises BlobUnknown otherwise).
_Authorize = Callable[[], Awaitable[None]]


class Sharing:
    """The cluster side of blob downloads (``BlobService`` asks it for a source)."""

    def __init__(self, cluster: Cluster, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        self._cluster = cluster
        self._session = session
        self._metrics = metrics
        self._uploads: set[asyncio.Task[None]] = set()
        self._uploading: weakref.WeakSet[Flight] = weakref.WeakSet()  # flights with an uploader
        self._log = structlog.get_logger("pullgate.sharing")

    async def choose(
        self,
        client: RegistryClient,
        route: Route,
        flight: Flight,
        dead: set[str],
        authorize: _Authorize,
        *,
        alone: bool = False,
    ) -> BlobSource:
        """The source to read ``flight`` from next (from ``flight.written`` on). ``dead``:
        peer URLs that failed this download already; ``alone``: the upstream, whoever holds
        the lease (the last resort of a download whose shared sources kept failing). Starts
        the upload to the object store when the answer is the upstream."""
        upstream = UpstreamSource(client, route, flight.digest)
        objects = self._cluster.objects
        if objects is None:
            return upstream
        stored = ObjectSource(objects, flight.digest)
        if not alone and await self._stored(flight.digest):
            await authorize()
            return stored
        coordinator = self._cluster.coordinator
        if alone or coordinator is None or coordinator.up is False:
            return self._alone(flight, upstream)  # or Redis down until a ping answers
        try:
            return await self._through_lease(coordinator, flight, upstream, stored, dead, authorize)
        except CoordinationUnavailable:
            return self._alone(flight, upstream)

    async def _through_lease(
        self,
        coordinator: Coordinator,
        flight: Flight,
        upstream: UpstreamSource,
        stored: ObjectSource,
        dead: set[str],
        authorize: _Authorize,
    ) -> BlobSource:
        """Take the blob's lease and download it, or stream from its holder, or wait for the
        holder's object."""
        name = f"blob:{flight.digest}"
        deadline = time.monotonic() + 2 * coordinator.lease_ttl
        while True:
            lease = await coordinator.acquire(name, note=self._cluster.advertise_url or "")
            if lease is not None:
                if await self._stored(flight.digest):
                    # A holder finished (uploaded, released) between our look and our lease.
                    await lease.finish()
                    await authorize()
                    return stored
                self._upload(flight, lease)
                return upstream
            holder = await coordinator.holder(name)
            if holder is not None and holder.note and holder.note not in dead and holder.owner != coordinator.owner:
                peer = await self._peer(coordinator, holder.note, flight.digest)
                if peer is not None:
                    await authorize()
                    return peer
            if (holder is not None and holder.note in dead) or time.monotonic() >= deadline:
                # The holder is unreachable (its lease outlives it until it expires) or
                # slower than we wait: fetch alone rather than keep the clients waiting.
                return self._alone(flight, upstream)
            await asyncio.sleep(_POLL)
            if await self._stored(flight.digest):
                await authorize()
                return stored

    async def _peer(self, coordinator: Coordinator, base: str, digest: Digest) -> PeerSource | None:
        token = await self._cluster.peer_secret()
        if token is None:
            return None
        url = self._cluster.peer_url(base, str(digest))
        tls = await self._cluster.peer_tls()
        return PeerSource(self._session, base, url, token, timeout=coordinator.timeout * 5, tls=tls)

    def _alone(self, flight: Flight, upstream: UpstreamSource) -> UpstreamSource:
        """The upstream without the cluster's lease (the upload still shares the result)."""
        self._upload(flight, None)
        return upstream

    async def presigned(self, digest: Digest, authorize: _Authorize) -> str | None:
        """Redirect mode (``storage.redirect``): a presigned GET URL of the blob, once the
        object store holds it and ``authorize`` passed (raises BlobUnknown otherwise). None
        when this replica serves the blob itself: redirects off, the blob not in the store
        yet (its download uploads it), or the store not answering (no client sees an error
        for it; the URL would only point at a dead store)."""
        objects = self._cluster.objects
        if objects is None or not self._cluster.redirect:
            return None
        if not await self._stored(digest):
            self._metrics.redirects.labels("not_stored" if self._cluster.storage_up else "unavailable").inc()
            return None
        await authorize()  # before any URL exists: a client that may not have the blob gets none
        try:
            # Signed here, no request made. The client starts its GET at once, and S3 checks
            # expiry only when a request starts (a long transfer outlives it), so redirect_ttl
            # bounds how long a leaked URL works, not how long a pull may take.
            url = await objects.presign(digest)
        except StorageUnavailable as exc:  # e.g. credentials that cannot be refreshed
            self._cluster.storage_health(False, exc)
            self._metrics.redirects.labels("unavailable").inc()
            return None
        self._metrics.redirects.labels("redirected").inc()
        return url

    async def _stored(self, digest: Digest) -> bool:
        objects = self._cluster.objects
        if objects is None or not self._cluster.storage_up:
            return False
        try:
            size = await objects.size(digest)
        except StorageUnavailable as exc:
            self._cluster.storage_health(False, exc)
            return False
        self._cluster.storage_health(True)
        return size is not None

    async def discard(self, digest: Digest) -> None:
        """Remove an object whose bytes did not match its digest key."""
        objects = self._cluster.objects
        if objects is None:
            return
        self._log.error("object_store_corrupt", digest=str(digest))
        await self._cluster.storage_call(lambda: objects.delete(digest))

    # --- uploads --------------------------------------------------------------------------
    def _upload(self, flight: Flight, lease: Lease | None) -> None:
        if self._cluster.objects is None or not self._cluster.storage_up:
            if lease is not None:
                self._spawn(lease.finish())
            return
        if lease is None and flight in self._uploading:
            return  # a download that went back to the upstream keeps its first uploader
        self._uploading.add(flight)
        self._spawn(self._store(flight, lease))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _store(self, flight: Flight, lease: Lease | None) -> None:
        """Upload the blob as the download writes it: the uploader is one more reader of the
        flight, so it gets the last byte only after the digest matched, and the object store
        makes the object visible only after its own check (``ObjectUpload.commit``)."""
        objects = self._cluster.objects
        assert objects is not None
        if lease is not None:
            lease.start_renewing()
        log = self._log.bind(digest=str(flight.digest))
        result = "failed"
        try:
            size = await asyncio.shield(flight.started)
            async with objects.upload(flight.digest, size) as upload:
                async for chunk in flight.read():
                    await upload.write(chunk)
                result = "stored" if await upload.commit() else "present"
            self._cluster.storage_health(True)
            log.info("blob_shared", size=size, result=result)
        except StorageUnavailable as exc:
            self._cluster.storage_health(False, exc)
            log.warning("blob_share_failed", error=exc.message)
        except PullgateError as exc:  # the download failed (it reports that itself) or the upload's check did
            log.info("blob_share_abandoned", reason=exc.message, code=exc.code)
        finally:
            self._metrics.object_uploads.labels(result).inc()
            if lease is not None:
                await lease.finish()

    async def close(self) -> None:
        """Let running uploads finish (bounded), then cancel them: an upload cut short is
        aborted, never completed."""
        if not self._uploads:
            return
        _, pending = await asyncio.wait(set(self._uploads), timeout=_UPLOAD_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
