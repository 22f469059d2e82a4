"""``ClusterCatalog``: the local ``Catalog`` of a replica, which also tells the cluster's
index in Redis (``ClusterIndex``) what it learnt about the image graph and pulls.

It wraps the replica's own catalog and forwards every call unchanged: lookups, proofs and
tags are the local tier's business. It copies three kinds of write to the cluster index —
a manifest stored (with its children), a blob stored, a pull — so the replica that holds
the ``evict`` lease can plan over what *every* replica stored and pulled. ``forget`` is
deliberately not copied: the local tier evicting an image says nothing about the bucket.

The copies never touch the request path: they are buffered in memory and pushed in
batches by ``flush`` (the mirror's flush loop, every few seconds), so a pull adds no Redis
round trip. Redis down: the buffer is kept (bounded; the oldest pull times go first) and
pushed when Redis answers again; nothing raises to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog

from proxy.oci.digest import Digest
from proxy.oci.mediatypes import ParsedManifest
from proxy.registry.catalog import Catalog, CatalogSnapshot, ManifestInfo, TagEntry
from proxy.registry.clusterindex import ClusterIndex, IndexEntry
from proxy.registry.coordination import CoordinationUnavailable

MAX_PENDING = 100_000  # objects and pulls each held while Redis is away


class ClusterCatalog:
    """A ``Catalog``. ``index`` answers the cluster index once Redis is configured and
    opened (None before: writes are buffered until then)."""

    def __init__(self, local: Catalog, index: Callable[[], ClusterIndex | None], *, clock: Callable[[], float]) -> None:
        self.local = local
        self._index = index
        self._clock = clock
        self._objects: dict[str, IndexEntry] = {}
        self._pulls: dict[str, float] = {}
        self._dropped = 0
        self._log = structlog.get_logger("pullgate.clusterindex")

    @property
    def total_bytes(self) -> int:
        return self.local.total_bytes

    @property
    def unpushed(self) -> int:
        """Records not yet pushed to the cluster index."""
        return len(self._objects) + len(self._pulls)

    async def open(self) -> None:
        await self.local.open()

    async def close(self) -> None:
        await self.push()
        await self.local.close()

    async def reconcile(self, present: Iterable[tuple[Digest, int]]) -> int:
        return await self.local.reconcile(present)

    # --- tags and manifests ------------------------------------------------------------------
    async def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        return await self.local.tag(upstream, repository, tag)

    async def set_tag(self, upstream: str, repository: str, tag: str, digest: Digest, checked: float) -> None:
        await self.local.set_tag(upstream, repository, tag, digest, checked)

    async def manifest(self, digest: Digest) -> ManifestInfo | None:
        return await self.local.manifest(digest)

    async def has_image(self, upstream: str, repository: str, digest: Digest) -> bool:
        return await self.local.has_image(upstream, repository, digest)

    async def add_manifest(
        self, upstream: str, repository: str, digest: Digest, size: int, parsed: ParsedManifest, *, proved: float
    ) -> None:
        await self.local.add_manifest(upstream, repository, digest, size, parsed, proved=proved)
        children = tuple(str(c.digest) for c in parsed.children)  # as the local catalog's refs
        self._add(IndexEntry(str(digest), size, children, self._clock()))

    async def parents(self, upstream: str, repository: str, digest: Digest) -> list[Digest]:
        return await self.local.parents(upstream, repository, digest)

    async def image_names(self, digest: Digest) -> list[str]:
        return await self.local.image_names(digest)

    # --- blobs and proofs ----------------------------------------------------------------------
    async def add_blob(self, digest: Digest, size: int) -> None:
        await self.local.add_blob(digest, size)
        if str(digest) not in self._objects:  # a manifest's record (with children) wins
            self._add(IndexEntry(str(digest), size, None, self._clock()))

    async def proof(self, upstream: str, repository: str, digest: Digest) -> float | None:
        return await self.local.proof(upstream, repository, digest)

    async def prove(self, upstream: str, repository: str, digest: Digest, when: float) -> None:
        await self.local.prove(upstream, repository, digest, when)

    async def disprove(self, upstream: str, repository: str, digest: Digest) -> None:
        await self.local.disprove(upstream, repository, digest)

    # --- pull statistics -----------------------------------------------------------------------
    def touch(self, upstream: str, repository: str, digest: Digest) -> None:
        self.local.touch(upstream, repository, digest)
        key = str(digest)
        if key not in self._pulls and len(self._pulls) >= MAX_PENDING:
            self._pulls.pop(next(iter(self._pulls)))  # the oldest pull time goes first
            self._dropped += 1
        self._pulls[key] = self._clock()

    async def flush(self) -> bool:
        """The local catalog's answer; the cluster index is pushed on the way (best effort)."""
        done = await self.local.flush()
        await self.push()
        return done

    async def push(self) -> bool:
        """Send what is buffered to the cluster index; False (and kept) when Redis did not
        take it. Never raises."""
        index = self._index()
        if index is None or not (self._objects or self._pulls):
            return index is not None
        objects, pulls = self._objects, self._pulls
        self._objects, self._pulls = {}, {}
        try:
            await index.record(list(objects.values()), pulls.items())
        except CoordinationUnavailable as exc:
            # Whatever arrived meanwhile is newer; put the batch back behind it.
            self._objects = {**objects, **self._objects}
            self._pulls = {**pulls, **self._pulls}
            self._trim()
            self._log.debug("cluster_index_push_failed", error=exc.message, unpushed=self.unpushed)
            return False
        if self._dropped:
            self._log.warning("cluster_index_records_dropped", dropped=self._dropped, reason="redis was unavailable")
            self._dropped = 0
        return True

    def _add(self, entry: IndexEntry) -> None:
        self._objects[entry.digest] = entry
        self._trim()

    def _trim(self) -> None:
        for buffer in (self._objects, self._pulls):
            while len(buffer) > MAX_PENDING:
                buffer.pop(next(iter(buffer)))
                self._dropped += 1

    # --- maintenance ---------------------------------------------------------------------------
    async def snapshot(self) -> CatalogSnapshot:
        return await self.local.snapshot()

    async def forget(self, digests: Iterable[Digest]) -> None:
        await self.local.forget(digests)  # the local tier only: the bucket keeps its copy

    async def totals(self) -> tuple[int, int]:
        return await self.local.totals()
