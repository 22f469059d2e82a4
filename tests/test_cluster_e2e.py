"""Issue 17, "Done when", with real processes: three pullgate daemons (``python -m proxy
serve``) on one real SeaweedFS bucket and one real Redis, in front of the real upstream
(Debian's ``docker-registry``, whose access log counts the blob GETs that reached it), and
a rollout storm of clients, each pulling the same cold 5-layer image (manifest by tag,
config, layers) from a random replica and retrying like containerd (the next replica,
``Range: bytes=N-`` from the byte reached; ``tests/support/puller.py``).

The image here is 60 MiB (24+16+10+6+4 MiB) to keep the file within a few minutes on a
2-core machine; ``bench/bench_cluster.py`` runs the same storm with the issue's ~300 MiB.
Where a test needs a download to be *running* when something breaks, a relay in front of
the registry slows blob bodies down (``tests/support/relay.py``), so the upstream still
serves every byte and still counts every GET.

- 60 clients, cold: exactly one upstream GET per blob cluster-wide; every digest right
  (two of the clients are real ``skopeo copy`` runs).
- ``kill -9`` of the replica holding the Redis lease of the biggest layer while it
  downloads it: every client completes (those of the dead replica resume elsewhere with
  Range), and the bucket holds only complete, digest-correct objects.
- Redis stopped mid-storm: no client sees an error; ``pullgate_coordination_up`` is 0.
- The object store stopped mid-storm: no client sees an error (pass-through from
  upstream); ``pullgate_object_store_up`` is 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestServer

from tests.support import skopeo
from tests.support.aio import ServerFactory
from tests.support.fleet import BUCKET, Fleet, gauge
from tests.support.images import ImageInfo, build_image
from tests.support.polling import eventually
from tests.support.puller import PullResult, pull, spread
from tests.support.redis_server import RedisServer
from tests.support.registry import Registry
from tests.support.relay import Relay
from tests.support.s3engine import S3Engine
from tests.support.seaweedfs import SeaweedFS

MiB = 1 << 20
LAYERS = (24 * MiB, 16 * MiB, 10 * MiB, 6 * MiB, 4 * MiB)  # biggest first: every client asks for it first
TAG = "1"
STORM = 60  # clients in the cold storm
FAULT_STORM = 20  # clients in the storms where a part fails
# Relay delay per 64 KiB chunk of a blob body: the 24 MiB layer takes ~2 s to download.
SLOW_CHUNK = 0.005
STORM_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def cold_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageInfo, str]:
    """The image in the upstream, pushed once; each test is cold by its own key prefix (S3
    and Redis) and its replicas' fresh cache directories."""
    repo = f"library/cluster-{secrets.token_hex(3)}"
    image = build_image(tmp_path_factory.mktemp("cluster-image"), TAG, layers=LAYERS)
    registry.push(image.layout, TAG, f"{repo}:{TAG}", all_images=False, timeout=120)
    return image, repo


def storm(urls: list[str], image: ImageInfo, repo: str, clients: int) -> list[PullResult]:
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(pull, urls, first, image, repo, TAG, timeout=30) for first in spread(clients, len(urls))]
        return [f.result(timeout=STORM_TIMEOUT) for f in futures]


def blob_gets(registry: Registry, digest: str, since: int) -> int:
    return registry.count_requests("GET", rf"/blobs/{digest}$", since=since)


def assert_all_complete(results: list[PullResult], image: ImageInfo) -> None:
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed[:3]
    whole = len(image.config_bytes) + sum(image.layer_sizes)
    assert all(r.bytes == whole for r in results)


def assert_bucket_clean(engine: S3Engine, prefix: str) -> set[str]:
    """Every object under ``prefix`` is a whole blob whose bytes match the digest in its key
    (an incomplete multipart upload is not an object). Returns the digests found."""
    client = engine.client()
    found = set()
    for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        key = item["Key"]
        algorithm, hexpart = key.split("/")[-3], key.split("/")[-1]
        assert key == f"{prefix}blobs/{algorithm}/{hexpart[:2]}/{hexpart}", key
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == hexpart, f"{key}: {len(body)} bytes that do not match"
        found.add(f"{algorithm}:{hexpart}")
    return found


def sharing_events(fleet: Fleet) -> str:
    """What each replica did with the blobs (for a failure's message)."""
    names = {"blob_source_failed", "blob_shared", "blob_share_failed", "blob_share_abandoned", "blob_cached",
             "blob_fetch_failed", "coordination_down", "object_store_down"}  # fmt: skip
    lines = [
        f"{daemon.port} {event.get('timestamp', '')} {event.get('event')} "
        + " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "timestamp", "level", "logger"))
        for daemon in fleet.daemons for event in daemon.events() if event.get("event") in names
    ]  # fmt: skip
    return "\n".join(sorted(lines, key=lambda line: line.split(" ")[1]))


async def slow_upstream(registry: Registry, aiohttp_server: ServerFactory) -> str:
    server: TestServer = await aiohttp_server(Relay(registry.url, chunk_delay=SLOW_CHUNK).app())
    return str(server.make_url("")).rstrip("/")


async def run_storm(fleet: Fleet, image: ImageInfo, repo: str, clients: int) -> asyncio.Task[list[PullResult]]:
    """The storm in threads, while the test's event loop keeps serving the relay."""
    return asyncio.create_task(asyncio.to_thread(storm, fleet.urls, image, repo, clients))


async def finish(task: asyncio.Task[list[PullResult]]) -> list[PullResult]:
    return await asyncio.wait_for(task, STORM_TIMEOUT + 10)


async def leased(redis_url: str, fleet: Fleet, digest: str) -> str:
    """Wait for a replica to take the lease of ``digest``; its advertised URL."""
    holder: list[str] = []

    def taken() -> bool:
        note = lease_note(redis_url, fleet.key_prefix or "", digest)
        holder.extend([note] if note else [])
        return bool(holder)

    await eventually(taken, timeout=30, step=0.05)
    return holder[0]


async def reports(fleet: Fleet, name: str, value: float) -> None:
    """Every replica's ``/metrics`` shows ``name`` at ``value`` (its health check runs every 10 s)."""
    for url in fleet.urls:
        await eventually(lambda u=url: gauge(u, name) == value, timeout=25, step=0.2)  # type: ignore[misc]


def lease_note(url: str, key_prefix: str, digest: str) -> str | None:
    """The advertised URL of whoever holds ``blob:<digest>`` (value ``token|owner|note``)."""
    client = redis.Redis.from_url(url, socket_timeout=2, decode_responses=True)
    try:
        value = client.get(f"{key_prefix}lease:blob:{digest}")
    finally:
        client.close()
    return None if value is None else str(value).split("|", 2)[2]


# --- 1. the cold storm --------------------------------------------------------------------------
async def test_cold_storm_on_three_replicas_fetches_each_blob_once(
    registry: Registry, cold_image: tuple[ImageInfo, str], seaweedfs_engine: SeaweedFS,
    redis_server: RedisServer, key_prefix: str, tmp_path: Path,
) -> None:
    image, repo = cold_image
    with Fleet(tmp_path, registry.url, 3, engine=seaweedfs_engine, redis_url=redis_server.url,
               prefix=key_prefix) as fleet:  # fmt: skip
        mark = registry.mark()
        copies = [  # two real clients in the storm
            asyncio.create_task(skopeo.acopy(f"docker://{daemon.host}/{repo}:{TAG}", f"dir:{tmp_path / f'skopeo-{i}'}",
                                             all_images=False, timeout=STORM_TIMEOUT))
            for i, daemon in enumerate(fleet.daemons[:2])
        ]  # fmt: skip
        results = await asyncio.to_thread(storm, fleet.urls, image, repo, STORM - len(copies))
        await asyncio.gather(*copies)
        assert_all_complete(results, image)
        assert not [r.failures for r in results if r.failures]
        for i in range(len(copies)):
            for digest in image.blob_digests:
                pulled = (tmp_path / f"skopeo-{i}" / digest.removeprefix("sha256:")).read_bytes()
                assert hashlib.sha256(pulled).hexdigest() == digest.removeprefix("sha256:")
        gets = {digest: blob_gets(registry, digest, mark) for digest in image.blob_digests}
        assert gets == dict.fromkeys(image.blob_digests, 1), sharing_events(fleet)
        # The holders upload what they fetched: the bucket fills with verified blobs only.
        await eventually(lambda: assert_bucket_clean(seaweedfs_engine, key_prefix) >= set(image.blob_digests),
                         timeout=30, step=0.5)  # fmt: skip


# --- 2. kill -9 of the lease holder ---------------------------------------------------------------
async def test_kill_9_of_the_lease_holder_mid_download_loses_no_client_and_leaves_no_partial_object(
    registry: Registry, cold_image: tuple[ImageInfo, str], seaweedfs_engine: SeaweedFS,
    redis_server: RedisServer, key_prefix: str, tmp_path: Path, aiohttp_server: ServerFactory,
) -> None:
    image, repo = cold_image
    big = image.layer_digests[0]
    upstream = await slow_upstream(registry, aiohttp_server)
    with Fleet(tmp_path, upstream, 3, engine=seaweedfs_engine, redis_url=redis_server.url,
               prefix=key_prefix) as fleet:  # fmt: skip
        assert fleet.key_prefix is not None
        task = await run_storm(fleet, image, repo, FAULT_STORM)
        victim = fleet.by_url(await leased(redis_server.url, fleet, big))
        await asyncio.sleep(0.6)  # its clients have part of the layer
        await asyncio.to_thread(victim.kill)
        cached = [e for e in victim.events() if e.get("event") == "blob_cached" and e.get("digest") == big]
        assert not cached, "the holder had finished the layer before it was killed"
        results = await finish(task)
        assert_all_complete(results, image)
        failures = [f for r in results for f in r.failures]
        assert failures, "no client was cut off by the kill"
        assert {f.replica for f in failures} == {victim.url("")}  # only the dead replica failed anyone
        # Clients cut off mid-layer went on elsewhere from the byte they had reached.
        cut = {(f.what, f.offset) for f in failures if f.offset > 0}
        assert cut and cut <= {resume for r in results for resume in r.resumed}
        survivors = [d for d in fleet.daemons if d is not victim]
        stored = await asyncio.to_thread(assert_bucket_clean, seaweedfs_engine, key_prefix)
        # The survivors finish storing what they fetched, the big layer included.
        await eventually(lambda: assert_bucket_clean(seaweedfs_engine, key_prefix) >= set(image.blob_digests),
                         timeout=30, step=0.5)  # fmt: skip
        assert stored <= set(image.blob_digests) | {image.manifest_digest}  # manifests are shared too
        for daemon in survivors:
            assert daemon.proc is not None and daemon.proc.poll() is None


async def storm_losing(
    fleet: Fleet, image: ImageInfo, repo: str, redis_url: str, stop: Callable[[], None], metric: str
) -> None:
    """A storm that loses one shared part (``stop``) while the big layer downloads: no
    client notices, and every replica reports the part down on ``metric``."""
    task = await run_storm(fleet, image, repo, FAULT_STORM)
    await leased(redis_url, fleet, image.layer_digests[0])
    await asyncio.sleep(0.5)
    await asyncio.to_thread(stop)
    assert not task.done()  # stopped mid-storm
    results = await finish(task)
    assert_all_complete(results, image)
    assert not [r.failures for r in results if r.failures]
    await reports(fleet, metric, 0)


# --- 3. Redis stopped mid-storm -----------------------------------------------------------------
async def test_redis_stopped_mid_storm_pulls_continue(
    registry: Registry, cold_image: tuple[ImageInfo, str], seaweedfs_engine: SeaweedFS,
    key_prefix: str, tmp_path: Path, aiohttp_server: ServerFactory,
) -> None:
    image, repo = cold_image
    upstream = await slow_upstream(registry, aiohttp_server)
    with RedisServer(tmp_path / "redis") as own_redis, Fleet(
        tmp_path, upstream, 3, engine=seaweedfs_engine, redis_url=own_redis.url, prefix=key_prefix
    ) as fleet:
        await storm_losing(fleet, image, repo, own_redis.url, own_redis.stop, "pullgate_coordination_up")
        # Still serving, from local tiers and the bucket.
        again = await asyncio.to_thread(storm, fleet.urls, image, repo, 3)
        assert_all_complete(again, image)


# --- 4. the object store stopped mid-storm ------------------------------------------------------
async def test_object_store_stopped_mid_storm_pulls_continue_through_pass_through(
    registry: Registry, cold_image: tuple[ImageInfo, str], redis_server: RedisServer,
    key_prefix: str, tmp_path: Path, aiohttp_server: ServerFactory,
) -> None:
    image, repo = cold_image
    upstream = await slow_upstream(registry, aiohttp_server)
    with SeaweedFS(tmp_path / "seaweedfs") as own_store:
        own_store.create_bucket(BUCKET)
        with Fleet(tmp_path, upstream, 3, engine=own_store, redis_url=redis_server.url, prefix=key_prefix) as fleet:
            await storm_losing(fleet, image, repo, redis_server.url, own_store.stop, "pullgate_object_store_up")
