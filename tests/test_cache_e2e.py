"""The cache under load and faults, against the real registry: single flight with
streaming, serving while the upstream is down, quota eviction, a full disk, corrupt
upstream bytes, and SIGKILL mid-download."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS, MIRROR
from proxy.oci.digest import Digest
from tests.support.aio import ServerFactory
from tests.support.containerd import Containerd
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory, ImageInfo
from tests.support.polling import eventually
from tests.support.procs import CommandError
from tests.support.registry import Registry
from tests.support.relay import Relay

BLOBS = r"/blobs/sha256:[0-9a-f]{64}$"


def config(cache_dir: Path, upstream_url: str, **cache: Any) -> Config:
    return Config(
        cache=CacheConfig(dir=cache_dir, **cache),
        upstreams=(UpstreamConfig("docker.io", upstream_url),),
        timeouts=TimeoutConfig(connect=2, read=30, manifest=5, retries=0, backoff=0.05),
    )


async def start_mirror(aiohttp_server: ServerFactory, cfg: Config) -> tuple[str, web.Application]:
    app = create_app(cfg)
    server = await aiohttp_server(app)
    return f"http://{server.host}:{server.port}", app


async def start_relay(aiohttp_server: ServerFactory, registry: Registry, **options: Any) -> tuple[Relay, str]:
    relay = Relay(registry.url, **options)
    server = await aiohttp_server(relay.app())
    return relay, f"http://{server.host}:{server.port}"


async def fetch_digest(session: aiohttp.ClientSession, url: str, started: float) -> tuple[float, str, int]:
    """(seconds to first byte, sha256 of the body, bytes) — hashed as it streams."""
    hasher, first, size = hashlib.sha256(), 0.0, 0
    async with session.get(url) as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(1 << 16):
            if not size:
                first = time.monotonic() - started
            hasher.update(chunk)
            size += len(chunk)
    return first, "sha256:" + hasher.hexdigest(), size


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry this test may stop and start without disturbing the others."""
    with Registry(tmp_path / "upstream") as upstream:
        yield upstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def push(registry: Registry, image: ImageInfo, ref: str) -> None:
    await registry.apush(image.layout, image.tag, ref)


async def test_sixteen_concurrent_cold_pulls_make_one_upstream_get(
    registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    image = image_factory.image("1", layers=[64 << 20])
    await push(registry, image, f"{repo}:1")
    _, relay_url = await start_relay(aiohttp_server, registry, chunk_delay=0.002)  # ~2 s transfer
    mirror, _ = await start_mirror(aiohttp_server, config(tmp_path / "cache", relay_url))
    since = await registry.amark()
    async with session.get(f"{mirror}/v2/{repo}/manifests/1") as response:
        assert response.status == 200
    layer = image.layer_digests[0]
    started = time.monotonic()
    results = await asyncio.gather(
        *(fetch_digest(session, f"{mirror}/v2/{repo}/blobs/{layer}", started) for _ in range(16))
    )
    total = time.monotonic() - started
    assert {digest for _, digest, _ in results} == {layer}
    assert {size for _, _, size in results} == {image.layer_sizes[0]}
    assert await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since) == 1
    assert max(first for first, _, _ in results) < total / 2, "every client streams before the download ends"


async def test_upstream_down_serves_cached_tags_then_max_stale_expires(
    containerd: Containerd,
    own_registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    image = image_factory.image("1", layers=[30_000, 2_000])
    await push(own_registry, image, "library/offline:1")
    await push(own_registry, image_factory.image("2", layers=[1_000]), "library/offline:2")
    mirror, app = await start_mirror(
        aiohttp_server, config(tmp_path / "cache", own_registry.url, tag_ttl=0.0, max_stale=4.0)
    )
    assert (
        await containerd.apull("docker.io/library/offline:1", mirror, namespace=containerd.new_namespace())
        == image.manifest_digest
    )
    own_registry.stop()
    # Tag (stale) and digest, both from the cache.
    assert (
        await containerd.apull("docker.io/library/offline:1", mirror, namespace=containerd.new_namespace())
        == image.manifest_digest
    )
    by_digest = f"docker.io/library/offline@{image.manifest_digest}"
    namespace = containerd.new_namespace()
    await containerd.apull(by_digest, mirror, namespace=namespace)
    assert image.layer_digests[0] in containerd.content_digests(namespace=namespace)
    stale = app[METRICS].registry.get_sample_value(
        "pullgate_cache_requests_total", {"kind": "manifest", "result": "stale"}
    )
    assert stale is not None and stale >= 1
    # Never pulled: no way to serve it (containerd then tries the real server, which fails too).
    with pytest.raises(CommandError):
        await containerd.apull("docker.io/library/offline:2", mirror, namespace=containerd.new_namespace(), timeout=30)
    await asyncio.sleep(4.2)  # past max_stale: the tag may no longer be trusted
    with pytest.raises(CommandError):
        await containerd.apull("docker.io/library/offline:1", mirror, namespace=containerd.new_namespace(), timeout=30)


async def test_quota_evicts_least_recently_pulled_and_spares_readers(
    registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    images = {name: image_factory.image(name, layers=[4 << 20, 10_000]) for name in ("a", "b", "c")}
    for name, image in images.items():
        await push(registry, image, f"{repo}:{name}")
    # Room for two images, not three.
    mirror, app = await start_mirror(
        aiohttp_server, config(tmp_path / "cache", registry.url, max_size=10 << 20, low_water=0.9)
    )

    async def pull(name: str) -> None:
        async with session.get(f"{mirror}/v2/{repo}/manifests/{name}") as response:
            assert response.status == 200
        for digest in images[name].blob_digests:
            _, got, _ = await fetch_digest(session, f"{mirror}/v2/{repo}/blobs/{digest}", 0)
            assert got == digest
        # Clients get the last byte before the commit (fsync, rename): wait for it, as the
        # pull order is what eviction is judged by.
        store = app[MIRROR].store
        await eventually(lambda: all(store.size(Digest.parse(d)) is not None for d in images[name].blob_digests),
                         timeout=30)  # fmt: skip

    await pull("a")
    await pull("b")
    await app[MIRROR].catalog.flush()
    await asyncio.sleep(0.05)
    await pull("a")  # a is now more recent than b
    # A client is in the middle of reading b's big layer when c arrives and b is evicted.
    big = images["b"].layer_digests[0]
    reader = await session.get(f"{mirror}/v2/{repo}/blobs/{big}")
    hasher = hashlib.sha256(await reader.content.readexactly(1 << 16))
    await pull("c")
    for _ in range(200):  # the eviction runs in the background, one victim at a time
        evicted = app[METRICS].registry.get_sample_value("pullgate_cache_evictions_total")
        if evicted and app[MIRROR].catalog.total_bytes <= 10 << 20:
            break
        await asyncio.sleep(0.05)
    async for chunk in reader.content.iter_chunked(1 << 16):
        hasher.update(chunk)
    reader.release()
    assert "sha256:" + hasher.hexdigest() == big, "an in-progress read is unaffected by eviction"
    mirror_state = app[MIRROR]
    catalog = mirror_state.catalog
    kept = {name for name, image in images.items() if await catalog.manifest(Digest.parse(image.manifest_digest))}
    assert kept == {"a", "c"}, "b was least recently pulled"
    assert catalog.total_bytes <= 10 << 20
    for name in kept:  # no kept manifest points at missing bytes
        for digest in images[name].blob_digests:
            assert mirror_state.store.size(Digest.parse(digest)) is not None
    assert app[METRICS].registry.get_sample_value("pullgate_cache_evicted_bytes_total") >= 4 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real ENOSPC, not a simulated one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_passes_bytes_through_without_caching(
    registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    small_disk: Path,
    session: aiohttp.ClientSession,
) -> None:
    image = image_factory.image("1", layers=[6 << 20])
    await push(registry, image, f"{repo}:1")
    mirror, app = await start_mirror(aiohttp_server, config(small_disk / "cache", registry.url))
    layer = image.layer_digests[0]
    _, got, size = await fetch_digest(session, f"{mirror}/v2/{repo}/blobs/{layer}", 0)
    assert (got, size) == (layer, image.layer_sizes[0]), "the client still gets the whole, verified blob"
    assert app[MIRROR].store.size(Digest.parse(layer)) is None
    assert list(app[MIRROR].store.tmp.iterdir()) == []
    # And the mirror keeps working for what fits.
    async with session.get(f"{mirror}/v2/{repo}/manifests/1") as response:
        assert response.status == 200


async def test_corrupting_upstream_is_caught(
    registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    image = image_factory.image("1", layers=[500_000])
    await push(registry, image, f"{repo}:1")
    relay, relay_url = await start_relay(aiohttp_server, registry, corrupt=True)
    mirror, app = await start_mirror(aiohttp_server, config(tmp_path / "cache", relay_url))
    layer = image.layer_digests[0]
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch_digest(session, f"{mirror}/v2/{repo}/blobs/{layer}", 0)
    assert (
        app[METRICS].registry.get_sample_value(
            "pullgate_digest_mismatches_total", {"upstream": "docker.io", "kind": "blob"}
        )
        == 1
    )
    assert app[MIRROR].store.size(Digest.parse(layer)) is None
    relay.corrupt = False
    _, got, _ = await fetch_digest(session, f"{mirror}/v2/{repo}/blobs/{layer}", 0)
    assert got == layer


async def test_sigkill_mid_download_then_restart(
    registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    image = image_factory.image("1", layers=[8 << 20, 20_000])
    await push(registry, image, f"{repo}:1")
    _, relay_url = await start_relay(aiohttp_server, registry, chunk_delay=0.005)  # ~0.6 s transfer
    cache = tmp_path / "cache"
    daemon = Daemon(tmp_path / "daemon", relay_url, cache={"dir": str(cache)})
    await asyncio.to_thread(daemon.start)
    try:
        async with session.get(f"{daemon.url('')}/v2/{repo}/manifests/1") as response:
            assert response.status == 200
        big = image.layer_digests[0]
        response = await session.get(f"{daemon.url('')}/v2/{repo}/blobs/{big}")
        await response.content.readexactly(1 << 20)  # mid-download
        assert any((cache / "tmp").iterdir()), "a partial download is on disk"
        await asyncio.to_thread(daemon.kill)
        response.close()
        await asyncio.to_thread(daemon.start)
        assert list((cache / "tmp").iterdir()) == [], "partial files are cleaned at start"
        # The manifest survived the crash; the blob downloads again, correctly.
        async with session.get(f"{daemon.url('')}/v2/{repo}/manifests/1") as response:
            assert response.headers["Docker-Content-Digest"] == image.manifest_digest
        for digest in image.blob_digests:
            _, got, _ = await fetch_digest(session, f"{daemon.url('')}/v2/{repo}/blobs/{digest}", 0)
            assert got == digest
        # Clients get the last byte once it is verified; the commit (fsync, rename) follows.
        wanted = {d.split(":")[1] for d in image.blob_digests}
        await eventually(lambda: wanted <= {p.name for p in (cache / "blobs" / "sha256").rglob("*") if p.is_file()})
    finally:
        await asyncio.to_thread(daemon.stop)
