"""Blobs shared by replicas (``proxy.registry.sharing``, ``proxy.http.peerapi``): three
replicas in this process on one real Redis and one real S3 engine (SeaweedFS and Ceph RGW),
an upstream that counts its requests. One replica per blob fetches from upstream; the
others stream from it or read the object store; every client gets the right bytes; Redis
or the object store failing degrades to working alone, never to an error."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.oci.digest import Digest
from tests.support.images import sha256_digest
from tests.support.origin import Image, Origin
from tests.support.polling import eventually
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.replicas import BUCKET, Replica, cluster_config, start_replicas
from tests.support.s3engine import S3Engine

REPO = "library/shared"
LAYERS = [6 << 20, 3 << 20, 200_000]  # one multipart upload (5 MiB parts), two single puts


def upstream_url(origin: tuple[Origin, TestServer]) -> str:
    return str(origin[1].make_url("")).rstrip("/")


async def pull_blob(session: aiohttp.ClientSession, replica: Replica, digest: str, start: int = 0) -> bytes:
    headers = {"Range": f"bytes={start}-"} if start else {}
    async with session.get(f"{replica.url}/v2/{REPO}/blobs/{digest}", headers=headers) as response:
        assert response.status == (206 if start else 200), await response.text()
        return await response.read()


async def storm(replicas: list[Replica], image: Image, clients: int, seed: int = 7) -> None:
    """``clients`` concurrent clients per blob, each on a random replica; every body checked."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        jobs = [
            (digest, data, rng.choice(replicas)) for digest, data in image.blobs.items() for _ in range(clients)
        ]
        bodies = await asyncio.gather(*(pull_blob(session, r, d) for d, _, r in jobs))
    for (digest, data, _), body in zip(jobs, bodies, strict=True):
        assert sha256_digest(body) == digest and body == data


def stored_keys(engine: S3Engine, prefix: str) -> set[str]:
    listing = engine.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"].rpartition("/")[2] for item in listing.get("Contents", [])}


def sources(replicas: list[Replica]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for replica in replicas:
        for metric in replica.mirror.metrics.shared_tier.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels["source"]] = totals.get(sample.labels["source"], 0) + sample.value
    return totals


async def test_one_upstream_get_per_blob_across_replicas(
    origin: tuple[Origin, TestServer], s3_engine: S3Engine, redis_server: RedisServer, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=LAYERS)
    upstream.chunk_delay = 0.002  # a download lasts long enough for the others to join it
    base = cluster_config(tmp_path, upstream_url(origin), engine=s3_engine, redis_url=redis_server.url,
                          prefix=key_prefix)  # fmt: skip
    async with start_replicas(tmp_path, base, 3, monkeypatch, s3_engine) as replicas:
        await storm(replicas, image, clients=6)
        for digest in image.blobs:
            assert upstream.count("GET", digest) == 1, digest
        # The holder uploads after its clients are served; then every blob is in the bucket.
        await eventually(lambda: stored_keys(s3_engine, key_prefix) >= {d.partition(":")[2] for d in image.blobs},
                         timeout=30)  # fmt: skip
        seen = sources(replicas)
        assert seen.get("upstream") == len(image.blobs)
        assert seen.get("peer", 0) + seen.get("object_store", 0) >= len(image.blobs)  # the other replicas
        # A replica that joins later reads the object store, not the upstream.
        async with start_replicas(tmp_path / "late", base, 1, monkeypatch, s3_engine) as (late,):
            await storm([late], image, clients=2)
        for digest in image.blobs:
            assert upstream.count("GET", digest) == 1, digest


async def test_a_peer_that_dies_mid_transfer_is_resumed_from_upstream(
    origin: tuple[Origin, TestServer], seaweedfs_engine: S3Engine, redis_server: RedisServer, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=[4 << 20])
    (digest, data), = [(d, b) for d, b in image.blobs.items() if len(b) == 4 << 20]
    upstream.chunk_delay = 0.01  # ~0.6 s for the layer
    base = cluster_config(tmp_path, upstream_url(origin), engine=seaweedfs_engine, redis_url=redis_server.url,
                          prefix=key_prefix)  # fmt: skip
    async with start_replicas(tmp_path, base, 2, monkeypatch, seaweedfs_engine) as (holder, other):
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(pull_blob(session, holder, digest))
            await eventually(lambda: upstream.count("GET", digest) == 1, timeout=10)
            second = asyncio.create_task(pull_blob(session, other, digest))
            await eventually(lambda: sources([other]).get("peer", 0) == 0 and other.mirror.blobs.in_flight() != [],
                             timeout=10)  # fmt: skip
            await asyncio.sleep(0.1)
            await holder.stop()  # the holder's listener and downloads are gone; its lease is not
            assert await second == data
            with pytest.raises(aiohttp.ClientError):
                await first
        assert upstream.count("GET", digest) == 2  # the survivor went on from upstream
        assert sources([other]) == {"upstream": 1.0}


async def test_a_peer_asked_before_the_upstream_answered_it_waits_for_the_answer(
    origin: tuple[Origin, TestServer], seaweedfs_engine: S3Engine, redis_server: RedisServer, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The holder takes the lease before its upstream GET is answered; a replica asking it
    meanwhile must wait, not count it dead and fetch the blob a second time."""
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=[2 << 20])
    upstream.answer_delay = 1.0
    base = cluster_config(tmp_path, upstream_url(origin), engine=seaweedfs_engine, redis_url=redis_server.url,
                          prefix=key_prefix)  # fmt: skip
    async with start_replicas(tmp_path, base, 2, monkeypatch, seaweedfs_engine) as (first, second):
        async with aiohttp.ClientSession() as session:
            digest = max(image.blobs, key=lambda d: len(image.blobs[d]))
            holder = asyncio.create_task(pull_blob(session, first, digest))
            await eventually(lambda: upstream.count("GET", digest) == 1, timeout=10)
            assert await pull_blob(session, second, digest) == image.blobs[digest]
            assert await holder == image.blobs[digest]
        assert upstream.count("GET", digest) == 1
        assert sources([second]) == {"peer": 1.0}


@pytest.mark.parametrize("broken", ["redis", "object_store"])
async def test_a_dead_redis_or_object_store_degrades_to_working_alone(
    origin: tuple[Origin, TestServer], seaweedfs_engine: S3Engine, redis_server: RedisServer, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str,
) -> None:
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=[1 << 20, 50_000])
    dead = f"http://127.0.0.1:{free_port()}"
    base = cluster_config(
        tmp_path, upstream_url(origin), engine=seaweedfs_engine, prefix=key_prefix,
        redis_url=f"redis://127.0.0.1:{free_port()}" if broken == "redis" else redis_server.url,
        s3_endpoint=dead if broken == "object_store" else None,
    )  # fmt: skip
    async with start_replicas(tmp_path, base, 2, monkeypatch, seaweedfs_engine) as replicas:
        await storm(replicas, image, clients=3)
        gauge = "coordination_up" if broken == "redis" else "object_store_up"
        for replica in replicas:
            assert getattr(replica.mirror.metrics, gauge)._value.get() == 0
            async with aiohttp.ClientSession() as session, session.get(f"{replica.url}/readyz") as ready:
                assert ready.status == 200  # still ready: each replica serves alone
    for digest in image.blobs:
        assert 1 <= upstream.count("GET", digest) <= 2  # at most once per replica


@pytest.mark.parametrize(
    ("token", "digest", "status"),
    [
        (None, "known", 404),  # no secret: as if the path did not exist
        ("wrong", "known", 404),
        ("secret", "known", 200),
        ("secret", "unknown", 404),  # peers never fetch: only what this replica holds
        ("secret", "sha256:zz", 404),
    ],
)
async def test_peer_endpoint_serves_only_replicas_and_only_what_it_holds(
    origin: tuple[Origin, TestServer], seaweedfs_engine: S3Engine, redis_server: RedisServer, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None, digest: str, status: int,
) -> None:
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=[100_000])
    base = cluster_config(tmp_path, upstream_url(origin), engine=seaweedfs_engine, redis_url=redis_server.url,
                          prefix=key_prefix)  # fmt: skip
    async with start_replicas(tmp_path, base, 1, monkeypatch, seaweedfs_engine) as (replica,):
        known = next(iter(image.blobs))
        await storm([replica], image, clients=1)
        secret = await replica.mirror.cluster.peer_secret()
        assert secret
        target = {"known": known, "unknown": str(Digest.of(b"nothing"))}.get(digest, digest)
        headers = {"Authorization": f"Bearer {secret if token == 'secret' else token}"} if token else {}
        url = f"{replica.url}/_pullgate/peer/blobs/{target}"
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
            assert response.status == status
            if status == 200:
                assert await response.read() == image.blobs[known]
        assert upstream.count("GET", str(Digest.of(b"nothing"))) == 0


async def test_a_planted_object_is_never_served_whole_and_is_removed(
    origin: tuple[Origin, TestServer], seaweedfs_engine: S3Engine, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone with the bucket's keys writes other bytes under a digest key: the replica
    hashes what it reads, so its client gets a truncated transfer (never the last byte of
    wrong content); the object is deleted and the next pull fetches the real blob."""
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=[300_000])
    digest = max(image.blobs, key=lambda d: len(image.blobs[d]))
    real = image.blobs[digest]
    key = f"{key_prefix}blobs/sha256/{digest[7:9]}/{digest[7:]}"
    seaweedfs_engine.client().put_object(Bucket=BUCKET, Key=key, Body=b"X" + real[1:])
    base = cluster_config(tmp_path, upstream_url(origin), engine=seaweedfs_engine, redis_url=None, prefix=key_prefix)
    async with start_replicas(tmp_path, base, 1, monkeypatch, seaweedfs_engine) as (replica,):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                await pull_blob(session, replica, digest)
            assert upstream.count("GET", digest) == 0  # read from the planted object
            await eventually(lambda: digest[7:] not in stored_keys(seaweedfs_engine, key_prefix), timeout=10)
            assert await pull_blob(session, replica, digest) == real
        assert upstream.count("GET", digest) == 1
        await eventually(lambda: digest[7:] in stored_keys(seaweedfs_engine, key_prefix), timeout=20)
        stored = seaweedfs_engine.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert stored == real
