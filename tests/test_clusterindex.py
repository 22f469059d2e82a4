"""The cluster-wide quota on a real Redis and real S3 engines (SeaweedFS and Ceph RGW): the
image graph and pull times reach Redis through the catalog decorator (batched, nothing
on the request path), the replica holding the ``evict`` lease removes least recently
pulled images from the bucket and Redis — never a layer a kept image shares, never a blob
being downloaded — a replica without the lease deletes nothing, unrecorded old objects
are found and counted, and with Redis down nothing is deleted and nothing raises."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from proxy.config.settings import CacheConfig, Config
from proxy.config.storage import CoordinationConfig, StorageConfig
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import OCI_MANIFEST, Descriptor, ParsedManifest
from proxy.ops.metrics import Metrics
from proxy.registry.catalog import LocalCatalog
from proxy.registry.clustercatalog import ClusterCatalog
from proxy.registry.clustereviction import ClusterEviction
from proxy.registry.clusterindex import BYTES, REFS, SIZES, USED, ClusterIndex, IndexEntry
from proxy.registry.coordination import Coordinator
from proxy.registry.mirror import Mirror
from proxy.registry.objectstore import ObjectStore
from tests.conftest import S3_BUCKET
from tests.support.polling import eventually
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.s3engine import S3Engine

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
KiB = 1024


@dataclass
class Clock:
    now: float = field(default_factory=lambda: time.time() - 86_400)  # a day ago: uploads are "older"

    def __call__(self) -> float:
        return self.now


@dataclass
class Image:
    name: str
    manifest: Digest
    blobs: dict[Digest, bytes]  # config and layers
    body: bytes

    @property
    def members(self) -> set[Digest]:
        return {self.manifest, *self.blobs}


def blob(size: int, seed: str) -> tuple[Digest, bytes]:
    data = random.Random(seed).randbytes(size)
    return Digest.of(data), data


def image(name: str, *, shared: tuple[Digest, bytes] | None = None) -> Image:
    """A manifest with a config and a 4 KiB own layer (and ``shared`` as a second layer)."""
    parts = dict([blob(256, f"{name}-config"), blob(4 * KiB, f"{name}-layer")])
    if shared is not None:
        parts[shared[0]] = shared[1]
    body = repr(sorted(str(d) for d in parts)).encode()
    return Image(name, Digest.of(body), parts, body)


def parsed(img: Image) -> ParsedManifest:
    return ParsedManifest(OCI_MANIFEST, tuple(Descriptor(LAYER, d, len(b)) for d, b in img.blobs.items()))


@dataclass
class Replica:
    coordinator: Coordinator
    objects: ObjectStore
    catalog: ClusterCatalog
    eviction: ClusterEviction
    registry: CollectorRegistry

    def sample(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)


@pytest.fixture
def coordination(redis_server: RedisServer, key_prefix: str) -> CoordinationConfig:
    return CoordinationConfig(type="redis", url=redis_server.url, key_prefix=f"pg-{key_prefix.strip('/')}:",
                              timeout=2.0, lease_ttl=6.0)


@pytest.fixture
def storage(s3_engine: S3Engine, key_prefix: str) -> StorageConfig:
    return StorageConfig(type="s3", endpoint=s3_engine.endpoint, bucket=S3_BUCKET, prefix=key_prefix,
                         access_key_env="TEST_S3_ACCESS", secret_key_env="TEST_S3_SECRET", timeout=20.0)


@pytest.fixture
def s3_env(s3_engine: S3Engine) -> dict[str, str]:
    return {"TEST_S3_ACCESS": s3_engine.keys.access_key, "TEST_S3_SECRET": s3_engine.keys.secret_key}


@asynccontextmanager
async def replicas(
    count: int, tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, env: dict[str, str],
    clock: Clock, **eviction: object,
) -> AsyncIterator[list[Replica]]:
    """``count`` replicas, each with its own Redis and S3 connections and local catalog."""
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(count):
            coordinator = await stack.enter_async_context(Coordinator.open(coordination, {}, owner=f"replica-{i}"))
            objects = await stack.enter_async_context(ObjectStore.open(storage, env))
            index = ClusterIndex(coordinator)
            catalog = ClusterCatalog(LocalCatalog(tmp_path / f"replica-{i}.db"), partial(_same, index), clock=clock)
            await catalog.open()
            stack.push_async_callback(catalog.close)
            registry = CollectorRegistry()
            metrics = Metrics(registry)
            evictor = ClusterEviction(objects, coordinator, metrics, flush=catalog.flush, clock=clock,
                                      **eviction)  # type: ignore[arg-type]
            nodes.append(Replica(coordinator, objects, catalog, evictor, registry))
        yield nodes


def _same(index: ClusterIndex) -> ClusterIndex:
    return index


async def put(objects: ObjectStore, digest: Digest, data: bytes) -> None:
    async with objects.upload(digest, len(data)) as upload:
        await upload.write(data)
        await upload.commit()  # False: already there (a layer another image shares)


async def store(node: Replica, img: Image) -> None:
    """What a replica does when a client pulls ``img`` through it: blobs and manifest to the
    bucket, rows in its catalog (and so, batched, in Redis), one pull."""
    for digest, data in img.blobs.items():
        await put(node.objects, digest, data)
        await node.catalog.add_blob(digest, len(data))
    await put(node.objects, img.manifest, img.body)
    await node.catalog.add_manifest("hub", f"library/{img.name}", img.manifest, len(img.body), parsed(img), proved=0)
    node.catalog.touch("hub", f"library/{img.name}", img.manifest)


async def in_bucket(objects: ObjectStore) -> set[Digest]:
    return {o.digest async for o in objects.scan()}


async def redis_rows(node: Replica) -> set[str]:
    snapshot, _ = await node.eviction.index.snapshot()
    return set(snapshot.sizes)


def size_of(*images: Image) -> int:
    sizes = {img.manifest: len(img.body) for img in images}
    sizes.update({d: len(b) for img in images for d, b in img.blobs.items()})
    return sum(sizes.values())


@pytest.mark.parametrize(
    ("quota", "busy", "evicted", "kept_layers"),
    [
        # Over the quota by a little: the least recently pulled image (a) goes; the layer it
        # shares with b stays (b still needs it). b's replica recorded that layer after a's:
        # a layer's time must not make its older image look as recent as b.
        ("all-1", None, ["a"], ["shared"]),
        # Far over: a and b go (with the shared layer, nothing needs it any more), c stays.
        ("c", None, ["a", "b"], []),
        # Under the quota: nothing.
        ("all", None, [], ["shared"]),
        # a's own layer is being downloaded somewhere (a live lease): it stays, the rest of a goes.
        ("all-1", "a-layer", ["a"], ["a-layer", "shared"]),
    ],
)
async def test_lease_holder_evicts_least_recently_pulled_images(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str],
    quota: str, busy: str | None, evicted: list[str], kept_layers: list[str],
) -> None:
    clock = Clock()
    shared = blob(8 * KiB, "shared")
    a, b, c = image("a", shared=shared), image("b", shared=shared), image("c")
    total = size_of(a, b, c)
    max_size = {"all-1": total - 1, "all": total, "c": size_of(c)}[quota]
    async with replicas(2, tmp_path, coordination, storage, s3_env, clock,
                        max_size=max_size, low_water=1.0) as (one, two):
        # Pulled a, then b, then c (c most recently), through different replicas.
        for node, img in ((one, a), (two, b), (one, c)):
            clock.now += 60
            await store(node, img)
        for node in (one, two):
            assert await node.catalog.push()  # what the flush loop does every few seconds
        assert await one.eviction.index.total_bytes() == total
        lease = None
        if busy is not None:
            lease = await two.coordinator.acquire(f"blob:{blob(4 * KiB, busy)[0]}")
            assert lease is not None

        freed = await one.eviction.evict()

        gone = {d for name in evicted for d in {"a": a, "b": b, "c": c}[name].members}
        keep = {blob(8 * KiB, "shared")[0] if n == "shared" else blob(4 * KiB, n)[0] for n in kept_layers}
        gone -= keep
        everything = a.members | b.members | c.members
        assert await in_bucket(one.objects) == everything - gone
        assert await redis_rows(one) == {str(d) for d in everything - gone}
        sizes = {img.manifest: len(img.body) for img in (a, b, c)} | {d: len(x) for i in (a, b, c)
                                                                      for d, x in i.blobs.items()}
        assert freed == sum(sizes[d] for d in gone)
        remaining = await one.eviction.index.total_bytes()
        assert remaining == total - freed
        assert one.sample("pullgate_object_store_bytes") == remaining
        assert one.sample("pullgate_cluster_evictions_total") == len(evicted)
        assert one.sample("pullgate_cluster_evicted_bytes_total") == freed
        if lease is not None:
            await lease.release()


async def test_only_the_lease_holder_deletes(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str]
) -> None:
    clock = Clock()
    a, b = image("a"), image("b")
    async with replicas(3, tmp_path, coordination, storage, s3_env, clock,
                        max_size=size_of(b), low_water=1.0) as nodes:
        for img in (a, b):
            clock.now += 60
            await store(nodes[0], img)
        # A replica holding the lease (a round elsewhere) makes every other round a no-op.
        held = await nodes[2].coordinator.acquire("evict")
        assert held is not None
        assert await nodes[0].eviction.evict() == 0
        assert await in_bucket(nodes[0].objects) == a.members | b.members
        assert nodes[0].sample("pullgate_object_store_bytes") == size_of(a, b)  # the gauge is kept all the same
        await held.release()
        # Two replicas racing: one evicts a; the other got no lease, or came after and
        # found the bucket under its quota.
        results = await asyncio.gather(nodes[0].eviction.evict(), nodes[1].eviction.evict())
        assert sorted(results) == [0, size_of(a)]
        assert await in_bucket(nodes[1].objects) == b.members
        assert sum(n.sample("pullgate_cluster_evictions_total") or 0 for n in nodes) == 1
        assert await nodes[0].coordinator.holder("evict") is None  # released after the round


async def test_redis_down_deletes_nothing_and_raises_nothing(
    tmp_path: Path, storage: StorageConfig, s3_env: dict[str, str]
) -> None:
    clock = Clock()
    dead = CoordinationConfig(type="redis", url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, lease_ttl=3.0)
    img = image("a")
    async with replicas(1, tmp_path, dead, storage, s3_env, clock, max_size=1, low_water=0.5) as (node,):
        with capture_logs() as logs:
            await store(node, img)  # the pull is served: the records wait in memory
            assert node.catalog.unpushed == len(img.members) + 1  # objects + one pull
            assert await node.catalog.flush() is True  # the local catalog's answer
            assert node.catalog.unpushed == len(img.members) + 1  # kept for when Redis is back
            assert await node.eviction.evict() == 0
            assert await node.eviction.evict() == 0
        assert await in_bucket(node.objects) == img.members
        assert [e["event"] for e in logs if e["event"].startswith("cluster_evict")] == ["cluster_eviction_postponed"]
        assert await node.catalog.local.manifest(img.manifest) is not None


@pytest.mark.parametrize(
    ("grace", "recorded"),
    [
        (3600.0, True),  # uploaded "a day ago" by a replica that never recorded it: found
        (10 * 86_400.0, False),  # younger than the grace: its replica may still record it
    ],
)
async def test_reconcile_records_objects_nobody_recorded(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str],
    grace: float, recorded: bool,
) -> None:
    clock = Clock(now=time.time())
    stray, stray_data = blob(16 * KiB, "stray")
    img = image("a")
    async with replicas(1, tmp_path, coordination, storage, s3_env, clock,
                        max_size=size_of(img), low_water=1.0, grace=grace, scan_budget=2) as (node,):
        await put(node.objects, stray, stray_data)  # a replica killed before it recorded this
        clock.now += 86_400  # a day later: a is pulled now
        await store(node, img)
        for _ in range(3):  # two keys per round: the listing goes on across rounds
            await node.eviction.evict()
        if recorded:
            # Counted, then evicted first: nothing references it and it is the oldest.
            assert await in_bucket(node.objects) == img.members
            assert str(stray) not in await redis_rows(node)
        else:
            assert await in_bucket(node.objects) == img.members | {stray}
            assert await node.eviction.index.total_bytes() == size_of(img)


async def test_records_reach_redis_in_batches_and_local_eviction_does_not_touch_them(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str]
) -> None:
    clock = Clock()
    img = image("a")
    async with replicas(1, tmp_path, coordination, storage, s3_env, clock, max_size=0, low_water=0.9) as (node,):
        client, prefix = node.coordinator.client, node.coordinator.prefix
        await store(node, img)
        assert await client.exists(prefix + SIZES) == 0  # nothing sent on the request path
        assert await node.catalog.push()
        assert await client.hget(prefix + REFS, str(img.manifest)) == " ".join(str(d) for d in img.blobs)
        assert int(str(await client.get(prefix + BYTES))) == size_of(img)
        stored_at = await client.zscore(prefix + USED, str(img.manifest))
        assert stored_at is not None
        clock.now += 300
        node.catalog.touch("hub", "library/a", img.manifest)
        node.catalog.touch("hub", "library/gone", Digest.of(b"not recorded"))
        assert await node.catalog.push()
        assert await client.zscore(prefix + USED, str(img.manifest)) == stored_at + 300
        assert await client.zcard(prefix + USED) == len(img.members)  # no stray pull times
        # The same layer recorded again by another replica counts once.
        layer, data = next(iter(img.blobs.items()))
        assert await node.eviction.index.record([IndexEntry(str(layer), len(data), None, clock.now)]) == 0
        assert int(str(await client.get(prefix + BYTES))) == size_of(img)
        # The local tier evicting the image changes nothing in the bucket's record.
        await node.catalog.forget(img.members)
        assert await node.catalog.push()
        assert await redis_rows(node) == {str(d) for d in img.members}
        # No quota: rounds only keep the gauge.
        assert await node.eviction.evict() == 0
        assert node.sample("pullgate_object_store_bytes") == size_of(img)


async def test_mirror_with_redis_records_and_evicts_the_bucket(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    a, b = image("a"), image("b")
    config = Config(cache=CacheConfig(dir=tmp_path / "cache", low_water=1.0), coordination=coordination,
                    storage=replace(storage, max_size=size_of(b)))
    mirror = Mirror(config, Metrics(CollectorRegistry()))
    await mirror.open()
    try:
        assert isinstance(mirror.catalog, ClusterCatalog)
        assert mirror.cluster_eviction is not None and mirror.cluster.objects is not None
        node = Replica(mirror.cluster.coordinator, mirror.cluster.objects, mirror.catalog,  # type: ignore[arg-type]
                       mirror.cluster_eviction, CollectorRegistry())
        await store(node, a)
        await store(node, b)
        # The last pull is b's: a goes (the round flushes the mirror's own records first).
        mirror.catalog.touch("hub", "library/b", b.manifest)
        assert await mirror.cluster_eviction.evict() == size_of(a)
        assert await in_bucket(mirror.cluster.objects) == b.members
        # The local tier is the replica's own: it still has a's rows.
        assert await mirror.catalog.manifest(a.manifest) is not None
    finally:
        await mirror.close()


@pytest.mark.parametrize(
    ("age", "manifest", "dropped"),
    [
        (2 * 3600.0, False, True),  # a blob recorded while the bucket was down: stops counting
        (60.0, False, False),  # recorded a minute ago: its upload may still be finishing
        (2 * 3600.0, True, False),  # manifest rows keep the references that protect shared layers
    ],
)
async def test_reconcile_drops_rows_of_blobs_the_bucket_lacks(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str],
    age: float, manifest: bool, dropped: bool,
) -> None:
    clock = Clock(now=time.time())
    img = image("a")
    phantom, data = blob(32 * KiB, "phantom")
    async with replicas(1, tmp_path, coordination, storage, s3_env, clock, max_size=0, low_water=1.0) as (node,):
        clock.now -= 3 * 3600  # old enough to be checked against the bucket too (and found)
        await store(node, img)
        clock.now += 3 * 3600
        children = () if manifest else None
        await node.eviction.index.record([IndexEntry(str(phantom), len(data), children, clock.now - age)])
        await node.eviction.evict()
        rows = await redis_rows(node)
        assert (str(phantom) not in rows) is dropped
        assert rows >= {str(d) for d in img.members}  # what the bucket holds stays recorded
        expected = size_of(img) + (0 if dropped else len(data))
        assert await node.eviction.index.total_bytes() == expected
        assert node.sample("pullgate_object_store_bytes") == expected


async def test_a_poke_over_the_quota_starts_a_round_without_waiting_for_the_interval(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str]
) -> None:
    clock = Clock()
    a, b = image("a"), image("b")
    async with replicas(1, tmp_path, coordination, storage, s3_env, clock,
                        max_size=size_of(b), low_water=1.0, interval=3600.0) as (node,):
        task = asyncio.create_task(node.eviction.run())
        try:
            for img in (a, b):
                clock.now += 60
                await store(node, img)
            assert await node.catalog.push()
            node.eviction.poke()  # what the mirror does when a blob is stored
            objects = node.objects

            async def only_b() -> bool:
                return await in_bucket(objects) == b.members

            await eventually(only_b, timeout=30.0, step=0.2)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_manifest_recorded_while_the_snapshot_is_read_keeps_its_blobs(
    tmp_path: Path, coordination: CoordinationConfig, storage: StorageConfig, s3_env: dict[str, str]
) -> None:
    """The snapshot is read page by page: a manifest whose references were read but whose
    size was not (recorded in between) still protects what it references."""
    clock = Clock()
    layer, data = blob(4 * KiB, "layer")
    async with replicas(1, tmp_path, coordination, storage, s3_env, clock, max_size=1, low_water=1.0) as (node,):
        await put(node.objects, layer, data)
        await node.catalog.add_blob(layer, len(data))  # an old blob nothing references yet...
        assert await node.catalog.push()
        client, prefix = node.coordinator.client, node.coordinator.prefix
        await client.hset(prefix + REFS, "sha256:" + "ab" * 32, str(layer))  # ...until now
        assert await node.eviction.evict() == 0
        assert await in_bucket(node.objects) == {layer}
