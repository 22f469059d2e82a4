"""End to end, redirect mode: real clients (containerd, skopeo, podman) pull an image through
a pullgate replica with ``storage.redirect: true`` whose blobs are already in a real
SeaweedFS; every blob GET answers 307 to a presigned URL and the client fetches the bytes
from the object store itself.

The object store sits behind a byte-counting TCP relay (the presigned URLs point at it):
the bytes the store sent are counted below HTTP, whoever asked. The replica under test
starts with an empty local tier and ends with one: had it served blob bytes, it would have
downloaded them into its local tier first."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config.settings import Config
from proxy.oci.digest import Digest
from tests.support import skopeo
from tests.support.containerd import Containerd
from tests.support.images import ImageFactory, ImageInfo, OciLayout, assert_layout_matches
from tests.support.polling import eventually
from tests.support.procs import arun
from tests.support.registry import Registry
from tests.support.replicas import BUCKET, Replica, cluster_config, start_replicas
from tests.support.s3engine import S3Engine
from tests.support.tcprelay import TcpRelay

LAYERS = [3 << 20, 300_000, 5_000]
BLOBS = r"/blobs/sha256:[0-9a-f]{64}$"


@pytest.fixture
async def relay(seaweedfs_engine: S3Engine) -> AsyncIterator[TcpRelay]:
    relay = await TcpRelay(seaweedfs_engine.port).start()
    yield relay
    await relay.close()


def redirect_config(tmp_path: Path, registry: Registry, engine: S3Engine, relay: TcpRelay, prefix: str) -> Config:
    base = cluster_config(tmp_path, registry.url, engine=engine, redis_url=None, prefix=prefix,
                          s3_endpoint=relay.endpoint)  # fmt: skip
    # A generous S3 timeout: an upload that times out on a busy machine marks the store down
    # (served here, not redirected) until the next health check.
    return replace(base, storage=replace(base.storage, redirect=True, timeout=30.0))


def in_bucket(engine: S3Engine, prefix: str) -> set[str]:
    listing = engine.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {"sha256:" + item["Key"].rpartition("/")[2] for item in listing.get("Contents", [])}


def sample(replica: Replica, name: str, **labels: str) -> float:
    return replica.mirror.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def warm_then_fresh(
    tmp_path: Path, config: Config, engine: S3Engine, prefix: str, image: ImageInfo, repo: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Replica]:  # fmt: skip
    """One pull through a first replica puts every blob in the bucket; then a fresh replica
    (empty local tier) is the one under test."""
    async with start_replicas(tmp_path / "warm", config, 1, monkeypatch, engine) as (warm,):
        host = warm.url.removeprefix("http://")
        await skopeo.acopy(f"docker://{host}/{repo}:1", f"oci:{tmp_path / 'warm-copy'}:x")
        await eventually(lambda: in_bucket(engine, prefix) >= set(image.blob_digests), timeout=60, step=0.2)
    async with start_replicas(tmp_path / "fresh", config, 1, monkeypatch, engine) as (fresh,):
        yield fresh


def assert_redirected(replica: Replica, image: ImageInfo, relay: TcpRelay, before: int) -> None:
    """Every blob GET was a 307, nothing reached this replica's local tier, and the object
    store sent at least every blob's bytes through the relay."""
    assert sample(replica, "pullgate_blob_redirects_total", result="redirected") >= len(image.blob_digests)
    assert sample(replica, "pullgate_blob_redirects_total", result="not_stored") == 0
    assert sample(replica, "pullgate_cache_requests_total", kind="blob", result="hit") == 0
    assert sample(replica, "pullgate_cache_requests_total", kind="blob", result="miss") == 0
    for digest in image.blob_digests:
        assert replica.mirror.store.size(Digest.parse(digest)) is None, digest
    assert relay.bytes_down - before >= image.total_size - len(image.manifest_bytes)


async def test_skopeo_follows_blob_redirects(
    registry: Registry, seaweedfs_engine: S3Engine, relay: TcpRelay, image_factory: ImageFactory, repo: str,
    key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    image = image_factory.image("1", layers=LAYERS)
    await registry.apush(image.layout, "1", f"{repo}:1")
    config = redirect_config(tmp_path, registry, seaweedfs_engine, relay, key_prefix)
    async with warm_then_fresh(tmp_path, config, seaweedfs_engine, key_prefix, image, repo, monkeypatch) as replica:
        since, before = await registry.amark(), relay.bytes_down
        host = replica.url.removeprefix("http://")
        await skopeo.acopy(f"docker://{host}/{repo}:1", f"oci:{tmp_path / 'copy'}:x")
        assert_layout_matches(tmp_path / "copy", image)
        assert_redirected(replica, image, relay, before)
    assert await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since) == 0


async def test_containerd_follows_blob_redirects(
    containerd: Containerd, registry: Registry, seaweedfs_engine: S3Engine, relay: TcpRelay,
    image_factory: ImageFactory, repo: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    image = image_factory.image("1", layers=LAYERS)
    await registry.apush(image.layout, "1", f"{repo}:1")
    config = redirect_config(tmp_path, registry, seaweedfs_engine, relay, key_prefix)
    source = OciLayout(image.layout)
    async with warm_then_fresh(tmp_path, config, seaweedfs_engine, key_prefix, image, repo, monkeypatch) as replica:
        before = relay.bytes_down
        namespace = containerd.new_namespace()
        digest = await containerd.apull(f"docker.io/{repo}:1", replica.url, namespace=namespace)
        assert digest == image.manifest_digest
        for blob in image.blob_digests:
            assert containerd.content_get(blob, namespace=namespace) == source.blob_path(blob).read_bytes()
        assert_redirected(replica, image, relay, before)


async def test_podman_follows_blob_redirects(
    registry: Registry, seaweedfs_engine: S3Engine, relay: TcpRelay, image_factory: ImageFactory, repo: str,
    key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    image = image_factory.image("1", layers=LAYERS)
    await registry.apush(image.layout, "1", f"{repo}:1")
    config = redirect_config(tmp_path, registry, seaweedfs_engine, relay, key_prefix)
    async with warm_then_fresh(tmp_path, config, seaweedfs_engine, key_prefix, image, repo, monkeypatch) as replica:
        before = relay.bytes_down
        host = replica.url.removeprefix("http://")
        # podman (containers/image) with the mirror as a registries.conf mirror of docker.io
        # (plain HTTP: insecure), its own storage in a temp dir (vfs: no kernel features).
        registries = tmp_path / "registries.conf"
        registries.write_text(
            'unqualified-search-registries = []\n[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
            f'[[registry.mirror]]\nlocation = "{host}"\ninsecure = true\n'
        )
        storage = tmp_path / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{tmp_path / "run"}"\ngraphroot = "{tmp_path / "graph"}"\n'
        )
        env = {"CONTAINERS_STORAGE_CONF": str(storage), "CONTAINERS_REGISTRIES_CONF": str(registries)}
        podman = ["podman", "--cgroup-manager=cgroupfs", "--events-backend=none"]
        await arun([*podman, "pull", f"docker.io/{repo}:1"], timeout=120, env=env)
        listed = await arun([*podman, "images", "--digests", "--format", "json"], timeout=60, env=env)
        (entry,) = json.loads(listed.stdout)
        assert entry["Digest"] == image.manifest_digest
        assert_redirected(replica, image, relay, before)
