"""Cluster-wide quota: keeps the shared bucket under ``storage.max_size`` the way each
replica keeps its local tier under ``cache.max_size`` — whole images, least recently pulled
first, down to ``cache.low_water`` of the quota (``proxy.registry.eviction``) — planned over
the cluster's image graph in Redis (``ClusterIndex``).

**One replica at a time.** A round runs only under the Redis lease ``evict``; a replica
that does not get it does nothing, and a holder that loses it (renewal failed past its TTL)
stops before its next delete. Redis down: no round at all — without the lease and the
graph nothing is deleted (``cluster_eviction_postponed``, logged once per outage).

**Never a blob a kept image needs.** The plan keeps every object a kept manifest
references, and skips digests some replica is downloading (a live ``lease:blob:<digest>``).
The index rows go first, then the objects (``ObjectStore.delete``): an object whose delete
failed is merely unrecorded, and reconcile finds it again.

**Reconcile**, a bounded slice per round, both ways:

- an object can reach the bucket without reaching the index (its replica was killed
  between the upload and the flush, or Redis was away longer than the buffer holds). Each
  round reads ``scan_budget`` keys of one ongoing listing of the bucket (continued across
  rounds, restarted at the end) and records the objects the index does not know and that
  are older than ``grace`` (a fresh upload's record may still be in its replica's buffer)
  as images of their own, last used at their upload time: they count toward the quota
  and, referenced by nothing, are the first to go;
- a blob can be recorded without reaching the bucket (a replica cached it while the
  object store was down). Each round checks ``check_budget`` recorded blobs (``HSCAN``,
  continued across rounds) untouched for ``grace`` with a HEAD, and drops the rows of
  those the bucket does not have, so they stop counting. Manifest rows stay: they carry
  the references that keep shared layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from proxy.oci.digest import Digest
from proxy.ops.metrics import Metrics
from proxy.registry.clusterindex import ClusterIndex, IndexEntry
from proxy.registry.coordination import CoordinationUnavailable, Coordinator, Lease
from proxy.registry.eviction import Victim, plan_eviction
from proxy.registry.objectstore import ObjectStore, StoredObject
from proxy.registry.s3client import StorageUnavailable

LEASE = "evict"
INTERVAL = 60.0  # between rounds; a stored blob pokes the task earlier (at most every MIN_GAP)
MIN_GAP = 5.0
GRACE = 3600.0  # an unrecorded object younger than this may still be recorded by its replica
SCAN_BUDGET = 5_000  # bucket keys reconciled per round
CHECK_BUDGET = 50  # recorded blobs checked against the bucket per round (one HEAD each)
_CHECK = 500  # keys looked up in the index per command


class ClusterEviction:
    """One replica's part in the cluster quota: ``run`` (the supervised loop), ``poke``
    (something was stored: check soon), ``evict`` (one round, now)."""

    def __init__(
        self,
        objects: ObjectStore,
        coordinator: Coordinator,
        metrics: Metrics,
        *,
        max_size: int,
        low_water: float,
        flush: Callable[[], Awaitable[object]] | None = None,
        on_storage: Callable[[bool, BaseException | None], None] = lambda up, error: None,
        grace: float = GRACE,
        scan_budget: int = SCAN_BUDGET,
        check_budget: int = CHECK_BUDGET,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.objects = objects
        self.coordinator = coordinator
        self.index = ClusterIndex(coordinator)
        self._metrics = metrics
        self.max_size = max_size
        self.low_water = low_water
        self._flush = flush
        self._on_storage = on_storage
        self.grace = grace
        self.scan_budget = scan_budget
        self.check_budget = check_budget
        self._rows_cursor = 0
        self.interval = interval
        self._clock = clock
        self._listing: AsyncIterator[StoredObject] | None = None
        self._poked = asyncio.Event()
        self._postponed = False
        self._log = structlog.get_logger("pullgate.clustereviction")
        metrics.object_store_max_bytes.set(max_size)

    # --- the task -------------------------------------------------------------------------------
    async def run(self) -> None:
        """A full round (reconcile included) every ``interval``; between them, a poke costs
        one Redis read, and a round only when the bucket is over its quota."""
        last = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, last + self.interval - time.monotonic())):
                    await self._poked.wait()
            self._poked.clear()
            if time.monotonic() - last >= self.interval or await self._over_quota():
                await self.evict()
                last = time.monotonic()
            await asyncio.sleep(MIN_GAP)

    async def _over_quota(self) -> bool:
        if not self.max_size:
            return False
        try:
            return await self.index.total_bytes() > self.max_size
        except CoordinationUnavailable:
            return False  # the next full round logs it

    def poke(self) -> None:
        self._poked.set()

    # --- one round ------------------------------------------------------------------------------
    async def evict(self, target: int | None = None) -> int:
        """Reconcile a slice of the bucket, then, over the quota (or above ``target`` when
        given), evict images down to ``target`` (default: the low-water mark). Returns the
        bytes evicted; 0 when another replica holds the lease or Redis is down. Never raises
        for Redis or the object store."""
        if self._flush is not None:
            await self._flush()  # this replica's buffered records take part in the plan
        try:
            async with self.coordinator.hold(LEASE) as lease:
                if lease is None:  # another replica's round: only keep the gauge true here
                    self._metrics.object_store_bytes.set(await self.index.total_bytes())
                    return 0
                evicted = await self._round(lease, target)
        except CoordinationUnavailable as exc:
            if not self._postponed:
                self._log.warning("cluster_eviction_postponed", error=exc.message)
            self._postponed = True
            return 0
        self._postponed = False
        return evicted

    async def _round(self, lease: Lease, target: int | None) -> int:
        busy = await self.index.downloading()
        await self._reconcile(busy)
        await self._check_rows(busy)
        total = await self.index.total_bytes()
        self._metrics.object_store_bytes.set(total)
        if target is None:
            if not self.max_size or total <= self.max_size:
                return 0
            target = int(self.max_size * self.low_water)
        if total <= target:
            return 0
        snapshot, late = await self.index.snapshot()
        # Planning a large bucket takes a while (0.7 s for 60k objects): off the event loop.
        victims = await asyncio.to_thread(plan_eviction, snapshot, target, busy | late)
        evicted = 0
        for victim in victims:
            if lease.lost.is_set():
                self._log.warning("cluster_eviction_stopped", reason="lease lost")
                break
            if not await self._evict(victim, lease):
                break
            evicted += victim.size
        self._metrics.object_store_bytes.set(await self.index.total_bytes())
        return evicted

    async def _evict(self, victim: Victim, lease: Lease) -> bool:
        """Rows, then objects. False when the round must stop (lease lost, bucket down)."""
        await self.index.forget(victim.members)  # none may point at deleted bytes
        for member in victim.members:
            if lease.lost.is_set():
                return False
            try:
                await self.objects.delete(Digest.parse(member))
            except StorageUnavailable as exc:
                self._on_storage(False, exc)
                self._log.warning("cluster_eviction_incomplete", root=victim.root, error=exc.message)
                return False  # the rest stay in the bucket unrecorded: reconcile finds them
        self._on_storage(True, None)
        self._metrics.cluster_evictions.inc()
        self._metrics.cluster_evicted_bytes.inc(victim.size)
        self._log.info(
            "cluster_evicted",
            root=victim.root,
            objects=len(victim.members),
            bytes=victim.size,
            last_used=round(victim.last_used),
            token=lease.token,
        )
        return True

    # --- reconcile ------------------------------------------------------------------------------
    async def _reconcile(self, busy: frozenset[str]) -> None:
        """Record up to ``scan_budget`` listed objects the index does not know (and older
        than ``grace``). The listing goes on where the last round stopped."""
        seen: list[StoredObject] = []
        try:
            if self._listing is None:
                self._listing = self.objects.scan()
            async for stored in self._listing:
                seen.append(stored)
                if len(seen) >= self.scan_budget:
                    break
            else:
                self._listing = None  # the whole bucket was read: start over next round
        except StorageUnavailable as exc:
            self._on_storage(False, exc)
            self._listing = None
        cutoff = self._clock() - self.grace
        adopted = size = 0
        for start in range(0, len(seen), _CHECK):
            batch = [s for s in seen[start : start + _CHECK] if s.modified <= cutoff and str(s.digest) not in busy]
            known = await self.index.known([str(s.digest) for s in batch])
            orphans = [IndexEntry(str(s.digest), s.size, None, s.modified) for s in batch if str(s.digest) not in known]
            if orphans:
                size += await self.index.record(orphans)
                adopted += len(orphans)
        if adopted:
            self._log.info("cluster_orphans_recorded", objects=adopted, bytes=size)

    async def _check_rows(self, busy: frozenset[str]) -> None:
        """Drop the rows of up to ``check_budget`` recorded blobs the bucket does not hold."""
        cursor, rows = await self.index.rows(self._rows_cursor, self.check_budget)
        self._rows_cursor = cursor
        cutoff = self._clock() - self.grace
        missing: list[str] = []
        for row in rows:
            if row.manifest or row.used > cutoff or row.digest in busy:
                continue
            try:
                if await self.objects.size(Digest.parse(row.digest)) is None:
                    missing.append(row.digest)
            except StorageUnavailable as exc:
                self._on_storage(False, exc)
                return  # the bucket cannot tell: drop nothing
        if missing:
            size = await self.index.forget(missing)
            self._log.info("cluster_rows_dropped", objects=len(missing), bytes=size, reason="not in the bucket")
