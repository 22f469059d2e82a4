"""Replicas sharing manifest-level state (``proxy.registry.sharedstate``): two mirrors, each
with its own ``cache.dir``, on one real Redis and one real S3 engine (SeaweedFS and Ceph
RGW), in front of the ``Origin`` upstream, which counts every request.

A tag one replica resolved is answered by the other without an upstream request; a manifest
by digest comes from the object store while the upstream is down; a proof recorded by one
replica lets the other serve without a HEAD — but only to that exact repository; and with
Redis or the object store gone each replica still serves alone (no 500)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.config.storage import CoordinationConfig, StorageConfig
from proxy.http.app import create_app
from proxy.http.appkeys import MIRROR
from proxy.oci.digest import Digest
from proxy.registry.coordination import Coordinator
from proxy.registry.mirror import Mirror
from tests.conftest import S3_BUCKET
from tests.support.origin import OCI_INDEX, OCI_MANIFEST, Origin
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.s3engine import S3Engine

UPSTREAM = "docker.io"
APP, OTHER = "library/app", "library/other"  # the attacker's repository is OTHER
MANIFEST_ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}

Client = TestClient[object, object]  # type: ignore[type-arg]


class Replica:
    """One mirror app under a test client, and its Mirror."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @property
    def mirror(self) -> Mirror:
        return self.client.app[MIRROR]  # type: ignore[union-attr]

    async def get(self, path: str) -> tuple[int, bytes, str]:
        async with self.client.get(f"/v2/{path}", headers=MANIFEST_ACCEPT) as response:
            return response.status, await response.read(), response.headers.get("Content-Type", "")

    async def published(self) -> None:
        await asyncio.wait_for(self.mirror.manifests.published(), 30)


Start = Callable[..., Awaitable[Replica]]


def replica_config(
    root: Path, origin_url: str, engine: S3Engine | None, redis_url: str | None, prefix: str, *,
    s3_endpoint: str | None = None, tag_ttl: float = 300.0,
) -> Config:  # fmt: skip
    storage = StorageConfig(
        type="s3", endpoint=s3_endpoint or (engine.endpoint if engine else None), bucket=S3_BUCKET, prefix=prefix,
        access_key_env="TEST_S3_ACCESS", secret_key_env="TEST_S3_SECRET", timeout=5.0,
    )  # fmt: skip
    coordination = (
        CoordinationConfig(type="redis", url=redis_url, key_prefix=f"pg-{prefix.strip('/')}:", timeout=2.0)
        if redis_url else CoordinationConfig()
    )  # fmt: skip
    return Config(
        cache=CacheConfig(dir=root / "cache", tag_ttl=tag_ttl),
        upstreams=(UpstreamConfig(UPSTREAM, origin_url),),
        default_upstream=UPSTREAM,
        timeouts=TimeoutConfig(connect=2, read=10, manifest=5, retries=0, backoff=0.01),
        storage=storage,
        coordination=coordination,
    )


@pytest.fixture
async def start(
    origin: tuple[Origin, TestServer], s3_engine: S3Engine, redis_server: RedisServer, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Start]:  # fmt: skip
    """``await start(name, redis_url=..., s3_endpoint=...)``: a replica sharing the session's
    Redis and S3 engine (by default) with the others of this test."""
    monkeypatch.setenv("TEST_S3_ACCESS", s3_engine.keys.access_key)
    monkeypatch.setenv("TEST_S3_SECRET", s3_engine.keys.secret_key)
    origin_url = str(origin[1].make_url("")).rstrip("/")
    async with AsyncExitStack() as stack:

        async def replica(name: str, *, redis_url: str | None = redis_server.url, s3_endpoint: str | None = None,
                          tag_ttl: float = 300.0) -> Replica:  # fmt: skip
            config = replica_config(tmp_path / name, origin_url, s3_engine, redis_url, key_prefix,
                                    s3_endpoint=s3_endpoint, tag_ttl=tag_ttl)  # fmt: skip
            client: Client = TestClient(TestServer(create_app(config)))
            await client.start_server()
            stack.push_async_callback(client.close)
            return Replica(client)

        yield replica


def manifest_requests(origin: Origin, repository: str = APP) -> tuple[int, int]:
    """(HEADs, GETs) of manifests the upstream received for ``repository``."""
    fragment = f"/v2/{repository}/manifests/"
    return origin.count("HEAD", fragment), origin.count("GET", fragment)


async def test_a_tag_one_replica_resolved_costs_the_other_no_upstream_request(
    start: Start, origin: tuple[Origin, TestServer]
) -> None:
    upstream = origin[0]
    image = upstream.add_image(APP, "1")
    a, b = await start("a"), await start("b")
    assert (await a.get(f"{APP}/manifests/1"))[:2] == (200, image.manifest)
    await a.published()
    before = manifest_requests(upstream)
    assert before == (0, 1)
    # B has nothing locally: the tag from Redis, the manifest from the object store.
    status, body, content_type = await b.get(f"{APP}/manifests/1")
    assert (status, body, content_type) == (200, image.manifest, OCI_MANIFEST)
    # ...and by digest too (the tag made it this repository's own).
    assert (await b.get(f"{APP}/manifests/{image.digest}"))[:2] == (200, image.manifest)
    assert manifest_requests(upstream) == before
    assert Digest.parse(image.digest) in b.mirror.manifests._memory  # kept in B's local tier


async def test_a_tag_another_replica_saw_is_served_stale_while_the_upstream_is_down(
    start: Start, origin: tuple[Origin, TestServer]
) -> None:
    upstream = origin[0]
    image = upstream.add_image(APP, "1")
    a, b = await start("a", tag_ttl=1.0), await start("b", tag_ttl=1.0)
    assert (await a.get(f"{APP}/manifests/1"))[0] == 200
    await a.published()
    await asyncio.sleep(1.5)  # past tag_ttl: the shared record must be revalidated...
    upstream.status = 503  # ...and cannot be: within max_stale it is served
    assert (await b.get(f"{APP}/manifests/1"))[:2] == (200, image.manifest)
    assert manifest_requests(upstream) == (1, 1)  # B's HEAD (refused), A's GET


async def test_a_tampered_object_is_not_served_the_upstream_is_asked_instead(
    start: Start, origin: tuple[Origin, TestServer], s3_engine: S3Engine
) -> None:
    upstream = origin[0]
    image = upstream.add_image(APP, "1")
    a, b = await start("a"), await start("b")
    assert (await a.get(f"{APP}/manifests/1"))[0] == 200
    await a.published()
    objects = b.mirror.cluster.objects
    assert objects is not None
    forged = image.manifest.replace(b'"size": ', b'"size": 1', 1)
    await asyncio.to_thread(s3_engine.client().put_object, Bucket=S3_BUCKET,
                            Key=objects.key(Digest.parse(image.digest)), Body=forged)  # fmt: skip
    assert (await b.get(f"{APP}/manifests/1"))[:2] == (200, image.manifest)
    assert manifest_requests(upstream) == (0, 2)  # B fetched it again rather than serve the forgery
    await b.published()  # ...and put the right bytes in its place
    c = await start("c")
    assert (await c.get(f"{APP}/manifests/1"))[:2] == (200, image.manifest)
    assert manifest_requests(upstream) == (0, 2)


async def test_a_manifest_by_digest_comes_from_the_object_store_while_the_upstream_is_down(
    start: Start, origin: tuple[Origin, TestServer]
) -> None:
    upstream = origin[0]
    arm = upstream.add_image(APP, None)
    amd = upstream.add_image(APP, None)
    index = upstream.add_index(APP, "multi", {"linux/amd64": amd, "linux/arm64": arm})
    a = await start("a")
    assert (await a.get(f"{APP}/manifests/multi"))[0] == 200
    for image in (amd, arm):  # the index's platform manifests are prefetched
        assert (await a.get(f"{APP}/manifests/{image.digest}"))[0] == 200
    await a.published()
    upstream.status = 503
    down = upstream.requests.copy()
    b = await start("b")
    for digest, body in ((index, None), (arm.digest, arm.manifest), (amd.digest, amd.manifest)):
        status, got, _ = await b.get(f"{APP}/manifests/{digest}")
        assert status == 200
        assert body is None or got == body
    assert upstream.requests == down  # not one request reached the upstream
    # Another repository was never shown to hold them: not served, whatever the store holds.
    assert (await b.get(f"{OTHER}/manifests/{arm.digest}"))[0] == 503


async def test_a_proof_lets_another_replica_serve_without_a_head_but_only_that_repository(
    start: Start, origin: tuple[Origin, TestServer]
) -> None:
    upstream = origin[0]
    image = upstream.add_image(APP, "1")
    layer = image.layers[0]
    (layer_digest,) = [d for d, data in image.blobs.items() if data == layer]
    # The attacker's public repository holds the same layer (B caches it from there) and a
    # manifest naming APP's manifest digest is nothing OTHER holds upstream.
    upstream.blobs[(OTHER, layer_digest)] = layer
    a, b = await start("a"), await start("b")
    assert (await a.get(f"{APP}/manifests/1"))[0] == 200
    async with a.client.head(f"/v2/{APP}/blobs/{layer_digest}") as response:
        assert response.status == 200  # a HEAD upstream: A records the proof, and shares it
    await a.published()
    assert (await b.get(f"{OTHER}/blobs/{layer_digest}"))[:2] == (200, layer)  # now in B's store
    blob_heads = upstream.count("HEAD", f"/v2/{APP}/blobs/")
    assert (await b.get(f"{APP}/blobs/{layer_digest}"))[:2] == (200, layer)
    assert upstream.count("HEAD", f"/v2/{APP}/blobs/") == blob_heads  # A's proof, not a HEAD
    # The attack: B holds APP's manifest now and Redis holds APP's proofs; OTHER gets neither.
    assert (await b.get(f"{APP}/manifests/{image.digest}"))[0] == 200
    assert (await b.get(f"{OTHER}/manifests/{image.digest}"))[0] == 404  # upstream HEAD: not there
    coordinator = b.mirror.cluster.coordinator
    assert coordinator is not None
    digest = Digest.parse(image.digest)
    assert await coordinator.get_proof(UPSTREAM, APP, digest) is not None
    assert await coordinator.get_proof(UPSTREAM, OTHER, digest) is None
    # A 404 upstream removes a proof from Redis for everyone.
    upstream.manifests.pop((APP, image.digest))
    c = await start("c")
    await coordinator.set_proof(UPSTREAM, APP, digest, checked=0.0, ttl=60)  # expired long ago: ask
    assert (await c.get(f"{APP}/manifests/{image.digest}"))[0] == 404
    assert await coordinator.get_proof(UPSTREAM, APP, digest) is None


@pytest.mark.parametrize("outage", ["redis_dead_port", "redis_stopped", "s3_dead_port"])
async def test_each_replica_serves_alone_when_a_shared_part_is_gone(
    start: Start, origin: tuple[Origin, TestServer], tmp_path: Path, outage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = origin[0]
    image = upstream.add_image(APP, "1")
    dead = f"http://127.0.0.1:{free_port()}"
    with RedisServer(tmp_path / "redis") as own_redis:
        redis_url = f"redis://127.0.0.1:{free_port()}/0" if outage == "redis_dead_port" else own_redis.url
        s3_endpoint = dead if outage == "s3_dead_port" else None
        a = await start("a", redis_url=redis_url, s3_endpoint=s3_endpoint)
        b = await start("b", redis_url=redis_url, s3_endpoint=s3_endpoint)
        assert (await a.get(f"{APP}/manifests/1"))[:2] == (200, image.manifest)
        await a.published()
        if outage == "redis_stopped":
            own_redis.stop()
        for replica in (b, a):
            for reference in ("1", image.digest):
                assert (await replica.get(f"{APP}/manifests/{reference}"))[:2] == (200, image.manifest)
            for digest, data in image.blobs.items():
                assert (await replica.get(f"{APP}/blobs/{digest}"))[:2] == (200, data)
        # B went to the upstream itself: nothing shared reached it.
        assert manifest_requests(upstream)[1] == 2
        coordinator = b.mirror.cluster.coordinator
        assert coordinator is not None
        if outage == "s3_dead_port":
            assert b.mirror.metrics.registry.get_sample_value("pullgate_object_store_up") == 0
            return
        # Known down: Redis is not asked per request (the health check turns it back on).
        assert coordinator.up is False
        commands = 0
        ask = coordinator.call

        async def counted(operation: str, request: Callable[[], Awaitable[object]]) -> object:
            nonlocal commands
            commands += 1
            return await ask(operation, request)

        monkeypatch.setattr(coordinator, "call", counted)
        other = upstream.add_image(APP, "2")
        assert (await b.get(f"{APP}/manifests/2"))[:2] == (200, other.manifest)
        for digest, data in other.blobs.items():  # downloads record proofs: not in Redis now
            assert (await b.get(f"{APP}/blobs/{digest}"))[:2] == (200, data)
        assert commands == 0


@pytest.mark.parametrize(
    ("repository", "error"),
    [
        (APP, None),
        ("library/app:sha256", ValueError),  # cannot pose as (upstream, "library/app", "sha256:...")
    ],
)
async def test_proof_keys_cannot_alias(redis_server: RedisServer, key_prefix: str, repository: str,
                                       error: type[Exception] | None) -> None:  # fmt: skip
    config = CoordinationConfig(type="redis", url=redis_server.url, key_prefix=f"pg-{key_prefix.strip('/')}:")
    digest = Digest.of(b"x")
    async with Coordinator.open(config, {}) as node:
        if error is not None:
            with pytest.raises(error):
                await node.set_proof(UPSTREAM, repository, digest, checked=1.0, ttl=60)
            return
        await node.set_proof(UPSTREAM, repository, digest, checked=1000.5, ttl=60)
        assert await node.get_proof(UPSTREAM, repository, digest) == 1000.5
        assert await node.get_proof("ghcr.io", repository, digest) is None
        await node.forget_proof(UPSTREAM, repository, digest)
        assert await node.get_proof(UPSTREAM, repository, digest) is None

