"""The cluster's image graph in Redis: every object recorded in the shared bucket with its
size, what each manifest references, and when each was last pulled — what
``plan_eviction`` needs to keep the bucket under ``storage.max_size`` the way each replica
keeps its local tier under ``cache.max_size`` (whole images, least recently pulled first).

Keys, under ``coordination.key_prefix`` (``P``):

- ``P index:sizes`` hash: digest -> bytes, every object recorded (manifests and blobs);
- ``P index:refs`` hash: manifest digest -> its children's digests, space-separated (a
  field here marks the digest as a manifest);
- ``P index:used`` sorted set: digest -> last pull (or store) time, epoch seconds (for
  planning, a blob some manifest references takes its image's time: ``snapshot``);
- ``P index:bytes`` string: the sum of ``index:sizes`` (the quota check reads one key).

Writes are Lua scripts so ``index:bytes`` moves with ``index:sizes`` atomically: a digest
recorded twice (two replicas storing the same layer) counts once, a forgotten one is
subtracted once. Times only move forward (``ZADD GT``), so a replica flushing an older
batch late cannot make an image look older than it is. A pull of a digest that is not
recorded (evicted meanwhile) is not recorded either: ``index:used`` holds no strays.

Snapshots read the three structures page by page (``HSCAN``/``ZSCAN``): each command stays
within ``coordination.timeout`` and Redis and the event loop stay free in between. They are
O(objects in the bucket), as the single-replica eviction's read of SQLite, and run on one
replica at a time (the ``evict`` lease), not per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from proxy.errors import DigestInvalid
from proxy.oci.digest import Digest
from proxy.registry.catalog import CatalogSnapshot
from proxy.registry.coordination import Coordinator

SIZES, REFS, USED, BYTES = "index:sizes", "index:refs", "index:used", "index:bytes"
BLOB_LEASE = "blob:"  # + digest: the lease of a replica downloading that blob (proxy.registry.sources)
_BATCH = 500  # entries per script call: keeps each one short for Redis's single thread
_SCAN_COUNT = 1000

# KEYS: sizes, refs, used, bytes. ARGV: n objects, then 4 per object (digest, size, children
# or "-" for a blob, time), then 2 per pull (digest, time). Returns the bytes newly counted.
_RECORD = """
local n = tonumber(ARGV[1])
local added = 0
local i = 2
for _ = 1, n do
  local digest, size, children, when = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HSETNX', KEYS[1], digest, size) == 1 then
    redis.call('INCRBY', KEYS[4], size)
    added = added + tonumber(size)
  end
  if children ~= '-' then redis.call('HSET', KEYS[2], digest, children) end
  redis.call('ZADD', KEYS[3], 'GT', when, digest)
  i = i + 4
end
while i < #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then redis.call('ZADD', KEYS[3], 'GT', ARGV[i + 1], ARGV[i]) end
  i = i + 2
end
return added
"""
# KEYS: sizes, refs, used, bytes. ARGV: digests. Returns the bytes no longer counted.
_FORGET = """
local removed = 0
for _, digest in ipairs(ARGV) do
  local size = redis.call('HGET', KEYS[1], digest)
  if size then
    redis.call('HDEL', KEYS[1], digest)
    redis.call('DECRBY', KEYS[4], size)
    removed = removed + tonumber(size)
  end
  redis.call('HDEL', KEYS[2], digest)
  redis.call('ZREM', KEYS[3], digest)
end
return removed
"""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One object to record: a manifest with its children, or a blob (``children`` None)."""

    digest: str
    size: int
    children: tuple[str, ...] | None
    when: float


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One recorded object as ``rows`` reads it."""

    digest: str
    size: int
    manifest: bool
    used: float  # last pull or store time (0: none recorded)


class ClusterIndex:
    """The Redis record above. Every method may raise ``CoordinationUnavailable``."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._keys = [SIZES, REFS, USED, BYTES]

    async def record(self, entries: Sequence[IndexEntry], pulls: Iterable[tuple[str, float]] = ()) -> int:
        """Record objects and pull times; returns the bytes newly counted."""
        added = 0
        for start in range(0, len(entries), _BATCH):
            args: list[str | int] = [len(entries[start : start + _BATCH])]
            for e in entries[start : start + _BATCH]:
                children = "-" if e.children is None else " ".join(e.children)
                args += [e.digest, e.size, children, repr(e.when)]
            added += int(await self._coordinator.script(_RECORD, self._keys, args))
        times = list(pulls)
        for start in range(0, len(times), _BATCH):
            args = [0]
            for digest, when in times[start : start + _BATCH]:
                args += [digest, repr(when)]
            await self._coordinator.script(_RECORD, self._keys, args)
        return added

    async def forget(self, digests: Iterable[str]) -> int:
        """Drop the rows of ``digests``; returns the bytes no longer counted."""
        keys = list(dict.fromkeys(digests))
        removed = 0
        for start in range(0, len(keys), _BATCH):
            removed += int(await self._coordinator.script(_FORGET, self._keys, list(keys[start : start + _BATCH])))
        return removed

    async def total_bytes(self) -> int:
        client, key = self._coordinator.client, self._coordinator.prefix + BYTES
        value = await self._coordinator.call("get", lambda: client.get(key))
        return int(value or 0)

    async def known(self, digests: Sequence[str]) -> set[str]:
        """Which of ``digests`` are recorded."""
        if not digests:
            return set()
        client, key = self._coordinator.client, self._coordinator.prefix + SIZES
        sizes: list[Any] = await self._coordinator.call("hmget", lambda: client.hmget(key, list(digests)))
        return {d for d, size in zip(digests, sizes, strict=True) if size is not None}

    async def rows(self, cursor: int, count: int) -> tuple[int, list[IndexRow]]:
        """About ``count`` recorded objects from ``cursor`` on (``HSCAN``: 0 starts, and a
        returned 0 means the pass is complete)."""
        prefix, client = self._coordinator.prefix, self._coordinator.client
        step: tuple[int, Any] = await self._coordinator.call(
            "hscan", partial(client.hscan, prefix + SIZES, cursor=cursor, count=count)
        )
        found: dict[str, str] = step[1]
        digests = list(found)
        if not digests:
            return int(step[0]), []

        async def details() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hmget(prefix + REFS, digests)
                pipe.zmscore(prefix + USED, digests)
                result: list[Any] = await pipe.execute()
                return result

        refs, used = await self._coordinator.call("rows", details)
        rows = [
            IndexRow(d, int(found[d]), ref is not None, float(score or 0.0))
            for d, ref, score in zip(digests, refs, used, strict=True)
        ]
        return int(step[0]), rows

    async def snapshot(self) -> tuple[CatalogSnapshot, frozenset[str]]:
        """Sizes, references and last pulls of everything recorded, read page by page (each
        page within the command timeout, the event loop free in between); and the digests
        to keep whatever the plan says: children of manifests recorded while the pages were
        read (their references arrived, their sizes not), which may need blobs the plan
        would otherwise count as unreferenced. References are read last for that reason."""
        sizes = {d: int(v) for d, v in (await self._scan("hscan", SIZES)).items()}
        used = await self._scan("zscan", USED)
        refs = await self._scan("hscan", REFS)
        pairs = [(parent, child) for parent, children in refs.items() for child in children.split()]
        late = frozenset(child for parent, child in pairs if parent not in sizes)
        # An image is as recent as its manifests: a layer's time says when some replica last
        # copied it, and a layer shared with a newer image would make an old image look new.
        referenced = {child for _, child in pairs} - set(refs)
        snapshot = CatalogSnapshot(
            sizes=sizes,
            manifests=set(refs),
            refs=pairs,
            last_used={d: float(score) for d, score in used.items() if d not in referenced},
        )
        return snapshot, late

    async def _scan(self, command: str, name: str) -> dict[str, Any]:
        """A whole hash (``hscan``) or sorted set (``zscan``), ``_SCAN_COUNT`` entries a command."""
        client, key = self._coordinator.client, self._coordinator.prefix + name
        scan = client.hscan if command == "hscan" else client.zscan
        found: dict[str, Any] = {}
        cursor = 0
        while True:
            step: tuple[int, Any] = await self._coordinator.call(
                command, partial(scan, key, cursor=cursor, count=_SCAN_COUNT)
            )
            cursor = int(step[0])
            found.update(step[1])
            if cursor == 0:
                return found

    async def downloading(self) -> frozenset[str]:
        """Digests some replica holds the download lease of (``lease:blob:<digest>``)."""
        client = self._coordinator.client
        pattern = f"{self._coordinator.prefix}lease:{BLOB_LEASE}*"
        strip = len(pattern) - 1
        found: set[str] = set()
        cursor = 0
        while True:
            step: tuple[int, list[Any]] = await self._coordinator.call(
                "scan", partial(client.scan, cursor=cursor, match=pattern, count=_SCAN_COUNT)
            )
            cursor, keys = int(step[0]), step[1]
            for key in keys:
                try:
                    found.add(str(Digest.parse(str(key)[strip:])))
                except DigestInvalid:
                    continue
            if cursor == 0:
                return frozenset(found)
