"""Manifest-level state several replicas share: tag records and provenance proofs in Redis,
manifests (by digest) in the object store — each call made only while that part answers.

Every call here degrades: a failure (``CoordinationUnavailable``, ``StorageUnavailable``)
answers "nothing shared" and the replica carries on alone from its local tier and the
upstream. Nothing is asked per request of a part known to be down: Redis is skipped while
``Coordinator.up`` is False (the cluster's health check, every ``HEALTH_INTERVAL``, turns it
back on), the object store for ``HEALTH_INTERVAL`` after a failure.

Manifests share the blob key space of the object store (``ObjectStore.key``): both are
content addressed, and a replica reads one back only through ``ObjectStore.read(verify=True)``
(hashed again, never trusted blindly). The media type is not stored beside the bytes: it is
read from the manifest itself (``parse_manifest`` without a ``Content-Type``), and a manifest
whose type cannot be told from its bytes alone (no ``mediaType`` field and a shape that
suggests another type) is not shared at all (``shareable``). That keeps one object per
digest — no sidecar that could disagree with it, no Redis needed to read it — and the
digest covers the type a replica serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from proxy.errors import BlobUnknown, DigestMismatch, ManifestInvalid
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import ParsedManifest, parse_manifest
from proxy.ops.supervisor import Supervisor
from proxy.registry.cluster import Cluster
from proxy.registry.coordination import CoordinationUnavailable, Coordinator, TagRecord
from proxy.registry.objectstore import ObjectStore
from proxy.registry.s3client import StorageUnavailable


def sniff(data: bytes, media_type: str | None = None) -> ParsedManifest | None:
    """The manifest as a replica reading only its bytes would parse it; None when that is
    not a manifest or (given ``media_type``) would be served under another type."""
    try:
        parsed = parse_manifest(data, None)
    except ManifestInvalid:
        return None
    return parsed if media_type is None or parsed.media_type == media_type else None


class SharedState:
    """One replica's view of what the others share (inert without a cluster)."""

    def __init__(self, cluster: Cluster | None) -> None:
        self._cluster = cluster
        self._publishing: set[asyncio.Event] = set()  # publications not finished yet
        self._log = structlog.get_logger("pullgate.sharedstate")

    @property
    def configured(self) -> bool:
        """Whether there is anything to share with (a single replica skips the work)."""
        cluster = self._cluster
        return cluster is not None and (cluster.objects is not None or cluster.coordinator is not None)

    def publish(self, tasks: Supervisor, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` (calls of this object) in the background, when anything is shared."""
        if not self.configured:
            return
        done = asyncio.Event()

        async def run() -> None:
            try:
                await job()
            finally:
                done.set()
                self._publishing.discard(done)

        self._publishing.add(done)
        if not tasks.start("manifest_publish", run, restart=False):
            self._publishing.discard(done)

    async def published(self) -> None:
        """Wait until every ``publish`` job started so far has ended."""
        while self._publishing:
            await next(iter(self._publishing)).wait()

    # --- which parts to ask -----------------------------------------------------------------
    def _redis(self) -> Coordinator | None:
        coordinator = self._cluster.coordinator if self._cluster is not None else None
        if coordinator is None or coordinator.up is False:
            return None
        return coordinator

    def _objects(self) -> ObjectStore | None:
        # After a failure the store is skipped until the cluster's health check (or another
        # caller's request) finds it answering again: one rule for blobs and manifests.
        cluster = self._cluster
        if cluster is None or cluster.objects is None or not cluster.storage_up:
            return None
        return cluster.objects

    def _storage_failed(self, exc: StorageUnavailable) -> None:
        if self._cluster is not None:
            self._cluster.storage_health(False, exc)

    def _storage_answered(self) -> None:
        if self._cluster is not None:
            self._cluster.storage_health(True)

    # --- tags -------------------------------------------------------------------------------
    async def tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        redis = self._redis()
        if redis is None:
            return None
        try:
            return await redis.get_tag(upstream, repository, tag)
        except CoordinationUnavailable:
            return None

    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: Digest, *, checked: float, ttl: float
    ) -> None:
        redis = self._redis()
        if redis is None or ttl <= 0:
            return
        try:
            await redis.set_tag(upstream, repository, tag, digest, ttl=ttl, checked=checked)
        except CoordinationUnavailable:
            return

    # --- proofs -----------------------------------------------------------------------------
    async def proof(self, upstream: str, repository: str, digest: Digest) -> float | None:
        redis = self._redis()
        if redis is None:
            return None
        try:
            return await redis.get_proof(upstream, repository, digest)
        except CoordinationUnavailable:
            return None

    async def prove(self, upstream: str, repository: str, digest: Digest, *, checked: float, ttl: float) -> None:
        redis = self._redis()
        if redis is None or ttl <= 0:
            return
        try:
            await redis.set_proof(upstream, repository, digest, checked=checked, ttl=ttl)
        except CoordinationUnavailable:
            return

    async def disprove(self, upstream: str, repository: str, digest: Digest) -> None:
        redis = self._redis()
        if redis is None:
            return
        try:
            await redis.forget_proof(upstream, repository, digest)
        except CoordinationUnavailable:
            return

    # --- manifests in the object store --------------------------------------------------------
    async def manifest(self, digest: Digest, max_size: int) -> bytes | None:
        """The verified bytes of ``digest`` from the object store, or None (absent, too large,
        not matching its digest, or the store failing)."""
        objects = self._objects()
        if objects is None:
            return None
        try:
            async with objects.read(digest, verify=True) as reader:
                if reader.size > max_size:
                    self._log.warning("shared_manifest_too_large", digest=str(digest), size=reader.size)
                    return None
                data = b"".join([chunk async for chunk in reader.chunks()])
        except BlobUnknown:
            self._storage_answered()
            return None
        except DigestMismatch as exc:
            # Not what its key promises (written by someone else with the bucket's keys): take
            # it away, so the next replica to fetch the manifest stores the right bytes there.
            self._log.error("shared_manifest_invalid", digest=str(digest), error=exc.message)
            await self._delete(objects, digest)
            return None
        except StorageUnavailable as exc:
            self._storage_failed(exc)
            return None
        self._storage_answered()
        return data

    async def _delete(self, objects: ObjectStore, digest: Digest) -> None:
        try:
            await objects.delete(digest)
        except StorageUnavailable as exc:
            self._storage_failed(exc)

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> bool:
        """Store verified manifest bytes (served as ``media_type``) under their digest;
        False when not stored."""
        objects = self._objects()
        if objects is None:
            return False
        if sniff(data, media_type) is None:
            # Its type cannot be told from its bytes: another replica could not serve it as is.
            self._log.info("manifest_not_shared", digest=str(digest), media_type=media_type)
            return False
        try:
            async with objects.upload(digest, len(data)) as upload:
                await upload.write(data)
                await upload.commit()
        except StorageUnavailable as exc:
            self._storage_failed(exc)
            return False
        self._storage_answered()
        return True
