"""The mirror app over HTTP, against a registry-shaped origin with fault knobs.

(The same behaviour against the real registry, skopeo and containerd is in
``test_mirror_e2e.py``.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.http.appkeys import METRICS, MIRROR, SENDER
from proxy.oci.digest import Digest
from proxy.registry.download import RECENT
from tests.support.aio import Client
from tests.support.images import sha256_digest
from tests.support.origin import OCI_INDEX, OCI_MANIFEST, MirrorUnderTest, Origin, StartMirror
from tests.support.polling import eventually

MANIFEST_HEADERS = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


def make_config(tmp_path: Path, origin_url: str, **cache: Any) -> Config:
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache", **cache),
        upstreams=(UpstreamConfig("docker.io", origin_url), UpstreamConfig("quay.io", origin_url)),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=2, read=5, manifest=5, retries=1, backoff=0.01),
    )


MirrorFactory = Callable[..., Awaitable[tuple[Client, Origin]]]


@pytest.fixture
def make_mirror(start_mirror: StartMirror, origin_url: str, tmp_path: Path) -> MirrorFactory:
    async def make(**cache: Any) -> MirrorUnderTest:
        return await start_mirror(make_config(tmp_path, origin_url, **cache))

    return make


@pytest.fixture
async def mirror(make_mirror: MirrorFactory) -> tuple[Client, Origin]:
    return await make_mirror()


async def raw_request(client: Client, method: str, path: str) -> tuple[int, bytes]:
    """Send the request line exactly as written: HTTP clients normalise '..' and '%2F' away."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def metric(client: Client, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_api_base(mirror: tuple[Client, Origin]) -> None:
    client, _ = mirror
    response = await client.get("/v2/")
    assert response.status == 200
    assert await response.json() == {}
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_manifest_headers_and_cache(mirror: tuple[Client, Origin], method: str) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0")
    for _ in range(3):
        response = await client.request(method, "/v2/library/app/manifests/1.0?ns=docker.io", headers=MANIFEST_HEADERS)
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Content-Length"] == str(len(image.manifest))
        assert response.headers["OCI-Namespace"] == "docker.io"
        assert await response.read() == (image.manifest if method == "GET" else b"")
    assert origin.count("GET", "/manifests/1.0") == 1, "served from cache after the first request"
    by_digest = await client.get(f"/v2/library/app/manifests/{image.digest}")
    assert await by_digest.read() == image.manifest
    assert origin.count("GET", f"/manifests/{image.digest}") == 0, "a tag fetch caches the digest too"


async def test_tag_revalidation_after_ttl(make_mirror: MirrorFactory) -> None:
    client, origin = await make_mirror(tag_ttl=0.0)  # every request revalidates
    first = origin.add_image("library/app", "1.0")
    assert (await client.get("/v2/app/manifests/1.0")).headers["Docker-Content-Digest"] == first.digest
    response = await client.get("/v2/app/manifests/1.0")
    assert response.headers["Docker-Content-Digest"] == first.digest
    assert origin.count("HEAD", "/manifests/1.0") == 1 and origin.count("GET", "/manifests/1.0") == 1
    moved = origin.add_image("library/app", "1.0")
    response = await client.get("/v2/app/manifests/1.0")
    assert response.headers["Docker-Content-Digest"] == moved.digest
    assert origin.count("GET", "/manifests/1.0") == 2


async def test_stale_tag_served_while_upstream_fails(make_mirror: MirrorFactory) -> None:
    client, origin = await make_mirror(tag_ttl=0.0, max_stale=1.0)
    image = origin.add_image("library/app", "1.0")
    await client.get("/v2/app/manifests/1.0")
    origin.status = 503
    response = await client.get("/v2/app/manifests/1.0")
    assert response.status == 200 and response.headers["Docker-Content-Digest"] == image.digest
    assert metric(client, "pullgate_cache_requests_total", {"kind": "manifest", "result": "stale"}) == 1
    # Digests are always served from cache, whatever the upstream does.
    assert (await client.get(f"/v2/app/manifests/{image.digest}")).status == 200
    await asyncio.sleep(1.1)  # past max_stale
    response = await client.get("/v2/app/manifests/1.0")
    assert response.status == 503
    assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_rate_limited_upstream_without_cache(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    origin.status = 429
    response = await client.get("/v2/app/manifests/1.0")
    assert response.status == 429
    assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_negative_cache(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    for _ in range(5):
        response = await client.get("/v2/app/manifests/typo")
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert origin.count("GET", "/manifests/typo") == 1


async def test_blob_miss_then_hit_and_range(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[300_000])
    await client.get("/v2/app/manifests/1.0")
    layer = image.layers[0]
    digest = sha256_digest(layer)
    response = await client.get(f"/v2/app/blobs/{digest}")
    assert response.status == 200 and await response.read() == layer
    assert response.headers["Docker-Content-Digest"] == digest
    # The client had its last (verified) byte before the file was made durable; the next
    # request is a cache hit once the commit is done.
    store = client.app[MIRROR].store
    await eventually(lambda: store.size(Digest.parse(digest)) == len(layer))
    # The file is in place a moment before the download lets go of it; until then a GET
    # joins the download instead of reading the file.
    await eventually(lambda: not client.app[MIRROR].blobs.in_flight())
    response = await client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=1000-"})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 1000-{len(layer) - 1}/{len(layer)}"
    assert await response.read() == layer[1000:]
    head = await client.head(f"/v2/app/blobs/{digest}")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(layer))
    assert origin.count("GET", f"/blobs/{digest}") == 1
    assert metric(client, "pullgate_bytes_served_total", {"source": "cache"}) == len(layer) - 1000
    assert metric(client, "pullgate_bytes_served_total", {"source": "upstream"}) >= len(layer)


async def test_blob_head_uncached_asks_upstream(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0")
    digest = sha256_digest(image.layers[1])
    response = await client.head(f"/v2/app/blobs/{digest}")
    assert response.status == 200 and response.headers["Content-Length"] == str(len(image.layers[1]))
    missing = await client.head("/v2/app/blobs/sha256:" + "0" * 64)
    assert missing.status == 404


async def test_corrupt_blob_is_never_served_whole_or_cached(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[200_000])
    digest = sha256_digest(image.layers[0])
    origin.corrupt.add(digest)
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):  # the client must see a broken transfer
        response = await client.get(f"/v2/app/blobs/{digest}")
        got = await response.read()
    assert got != image.layers[0]
    assert metric(client, "pullgate_digest_mismatches_total", {"upstream": "docker.io", "kind": "blob"}) == 1
    # The client sees the cut before the download has removed its temp file.
    await eventually(lambda: not client.app[MIRROR].blobs.in_flight())
    assert client.app[MIRROR].store.size(Digest.parse(digest)) is None
    await eventually(lambda: list((client.app[MIRROR].store.tmp).iterdir()) == [])
    origin.corrupt.clear()
    response = await client.get(f"/v2/app/blobs/{digest}")
    assert await response.read() == image.layers[0]


async def test_truncated_upstream_transfer(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[400_000])
    digest = sha256_digest(image.layers[0])
    origin.truncate.add(digest)
    with pytest.raises(aiohttp.ClientPayloadError):
        response = await client.get(f"/v2/app/blobs/{digest}")
        await response.read()
    assert client.app[MIRROR].store.size(Digest.parse(digest)) is None


async def test_single_flight_streams_to_every_client(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[2 << 20])
    await client.get("/v2/app/manifests/1.0")
    digest = sha256_digest(image.layers[0])
    origin.chunk_delay = 0.01  # 32 chunks: ~0.3 s upstream transfer
    started = time.monotonic()

    async def pull() -> tuple[float, bytes]:
        response = await client.get(f"/v2/app/blobs/{digest}")
        first = await response.content.read(1)
        first_at = time.monotonic() - started
        return first_at, first + await response.read()

    results = await asyncio.gather(*(pull() for _ in range(8)))
    total = time.monotonic() - started
    assert origin.count("GET", f"/blobs/{digest}") == 1
    assert all(body == image.layers[0] for _, body in results)
    assert max(first for first, _ in results) < total / 2, "clients stream before the download ends"


async def test_disconnecting_client_does_not_cancel_download(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[1 << 20])
    await client.get("/v2/app/manifests/1.0")
    digest = sha256_digest(image.layers[0])
    origin.chunk_delay = 0.01
    response = await client.get(f"/v2/app/blobs/{digest}")
    await response.content.read(10)
    response.close()
    for _ in range(200):
        if client.app[MIRROR].store.size(Digest.parse(digest)) is not None:
            break
        await asyncio.sleep(0.02)
    assert client.app[MIRROR].store.size(Digest.parse(digest)) == len(image.layers[0])


async def test_manifest_digest_mismatch(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0")
    origin.lie_about_digest = True
    response = await client.get("/v2/app/manifests/1.0")
    assert response.status == 502
    assert (await response.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert await client.app[MIRROR].catalog.tag("docker.io", "library/app", "1.0") is None
    assert client.app[MIRROR].store.size(Digest.parse(image.digest)) is None


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"<html>not a manifest</html>", "text/html", 502, "MANIFEST_INVALID"),
        (json.dumps({"schemaVersion": 1}).encode(), "application/json", 502, "MANIFEST_INVALID"),
        (b"{" + b" " * (5 << 20) + b"}", OCI_MANIFEST, 502, "MANIFEST_INVALID"),
    ],
)
async def test_bad_upstream_manifests(
    mirror: tuple[Client, Origin], body: bytes, content_type: str, status: int, code: str
) -> None:
    client, origin = mirror
    origin.put_manifest("library/app", "bad", content_type, body)
    response = await client.get("/v2/app/manifests/bad")
    assert response.status == status
    assert (await response.json())["errors"][0]["code"] == code
    assert await client.app[MIRROR].catalog.tag("docker.io", "library/app", "bad") is None


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/UPPER/manifests/1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/../b/manifests/1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/%2e%2e/b/manifests/1", 400, "NAME_INVALID"),
        ("GET", "/v2/a%2Fb/manifests/1", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/1", 400, "NAME_INVALID"),
        ("GET", "/v2/app/manifests/-tag", 400, "MANIFEST_INVALID"),
        ("GET", "/v2/app/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/blobs/latest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/manifests/1?ns=evil.example", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/app/blobs/sha256:" + "0" * 64 + "?ns=169.254.169.254", 404, "NAME_UNKNOWN"),
        ("PUT", "/v2/app/manifests/1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/app/manifests/1", 405, "UNSUPPORTED"),
        ("POST", "/v2/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/app/blobs/uploads/x", 405, "UNSUPPORTED"),
        ("GET", "/v2/app/nothing/here", 404, "NAME_UNKNOWN"),
    ],
)
async def test_bad_requests(mirror: tuple[Client, Origin], method: str, path: str, status: int, code: str) -> None:
    client, origin = mirror
    got_status, body = await raw_request(client, method, path)
    assert got_status == status
    assert json.loads(body)["errors"][0]["code"] == code
    assert sum(origin.requests.values()) == 0, "bad input never reaches the upstream"
    assert not any((client.app[MIRROR].store.blobs).rglob("*"))


async def test_cross_repository_blob_needs_upstream_confirmation(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    private = origin.add_image("acme/private", "1.0")
    await client.get("/v2/acme/private/manifests/1.0")
    secret = sha256_digest(private.layers[0])
    assert (await client.get(f"/v2/acme/private/blobs/{secret}")).status == 200
    origin.add_image("library/public", "1.0")
    response = await client.get(f"/v2/library/public/blobs/{secret}")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    response = await client.get(f"/v2/library/public/manifests/{private.digest}")
    assert response.status == 404


async def test_index_and_platform_fallback(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    amd = origin.add_image("library/multi", None)
    arm = origin.add_image("library/multi", None)
    index_digest = origin.add_index("library/multi", "1", {"linux/amd64": amd, "linux/arm64": arm})
    response = await client.get("/v2/multi/manifests/1", headers=MANIFEST_HEADERS)
    assert response.headers["Docker-Content-Digest"] == index_digest
    response = await client.get("/v2/multi/manifests/1", headers={"Accept": OCI_MANIFEST})
    assert response.headers["Docker-Content-Digest"] == amd.digest
    # Every platform manifest of the index was cached in the background: arm64 nodes can
    # pull while the upstream is down.
    for _ in range(100):
        if await client.app[MIRROR].catalog.has_image("docker.io", "library/multi", Digest.parse(arm.digest)):
            break
        await asyncio.sleep(0.01)
    origin.status = 503
    response = await client.get(f"/v2/multi/manifests/{arm.digest}")
    assert response.status == 200


async def test_path_prefix_routing(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("owner/app", "2")
    response = await client.get("/v2/quay.io/owner/app/manifests/2")
    assert response.status == 200 and response.headers["Docker-Content-Digest"] == image.digest
    assert "OCI-Namespace" not in response.headers


async def test_tags_list_passthrough_with_pagination(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    for tag in ("a", "b", "c"):
        origin.add_image("owner/app", tag)
    response = await client.get("/v2/quay.io/owner/app/tags/list?n=2")
    assert (await response.json())["tags"] == ["a", "b"]
    assert response.headers["Link"] == '</v2/quay.io/owner/app/tags/list?last=b&n=2>; rel="next"'
    response = await client.get("/v2/quay.io/owner/app/tags/list?n=2&last=b")
    assert (await response.json())["tags"] == ["c"]
    assert (await client.get("/v2/quay.io/nobody/tags/list")).status == 404


async def test_referrers_fall_back_to_empty_index(mirror: tuple[Client, Origin]) -> None:
    client, _ = mirror
    response = await client.get("/v2/app/referrers/sha256:" + "1" * 64 + "?artifactType=application/x")
    assert response.status == 200
    assert await response.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


async def test_health_ready_metrics(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    origin.add_image("library/app", "1.0")
    await client.get("/v2/app/manifests/1.0")
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["ready"] is True
    text = await (await client.get("/metrics")).text()
    for name in (
        "pullgate_http_requests_total",
        "pullgate_cache_requests_total",
        "pullgate_upstream_request_duration_seconds_bucket",
        "pullgate_cache_size_bytes",
        "pullgate_bytes_served_total",
    ):
        assert name in text
    assert 'pullgate_http_requests_total{endpoint="manifest",method="GET",status="200"} 1.0' in text


async def test_range_on_a_blob_still_downloading(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[1 << 20])
    await client.get("/v2/app/manifests/1.0")
    layer = image.layers[0]
    digest = sha256_digest(layer)
    origin.chunk_delay = 0.01  # 16 chunks: the download is still running below
    first = await client.get(f"/v2/app/blobs/{digest}")
    await first.content.readexactly(1000)
    resumed = await client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=500000-"})
    assert resumed.status == 206
    assert resumed.headers["Content-Range"] == f"bytes 500000-{len(layer) - 1}/{len(layer)}"
    assert await resumed.read() == layer[500000:]
    assert await first.read() == layer[1000:]
    assert origin.count("GET", f"/blobs/{digest}") == 1
    bad = await client.get(f"/v2/app/blobs/{digest}", headers={"Range": f"bytes={len(layer)}-"})
    assert bad.status == 416


async def test_clients_of_a_download_get_the_file_by_sendfile(
    mirror: tuple[Client, Origin], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client keeping up with a download and one joining far behind it (past what the
    download keeps in memory) are both sent windows of the download's file (``FileSender``),
    every byte right and the last one after verification."""
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[RECENT + (4 << 20)])
    await client.get("/v2/app/manifests/1.0")
    layer, digest = image.layers[0], sha256_digest(image.layers[0])
    sender = client.app[SENDER]
    windows: list[tuple[int, int]] = []
    send = sender.send

    async def recording(transport: Any, fd: int, offset: int, count: int, **kwargs: Any) -> None:
        windows.append((offset, count))
        await send(transport, fd, offset, count, **kwargs)

    monkeypatch.setattr(sender, "send", recording)
    origin.chunk_delay = 0.003  # 192 chunks of 64 KiB: the download runs ~0.6 s
    first = await client.get(f"/v2/app/blobs/{digest}")
    early = await first.content.readexactly(RECENT + (1 << 20))
    late = await client.get(f"/v2/app/blobs/{digest}")
    assert await late.read() == layer
    assert early + await first.read() == layer
    assert sorted(offset for offset, _ in windows)[:2] == [0, 0], "both clients started from the file"
    assert origin.count("GET", f"/blobs/{digest}") == 1


async def test_pipelined_blob_requests_on_one_connection_get_their_own_bytes(mirror: tuple[Client, Origin]) -> None:
    """Two GETs written at once on one keep-alive connection (the second a download still
    running when the first is sent by sendfile): each response carries exactly its blob,
    in order — bytes a sender thread writes never interleave with the next response."""
    client, origin = mirror
    image = origin.add_image("library/app", "1.0", layers=[3 << 20, 5 << 20])
    await client.get("/v2/app/manifests/1.0")
    first, second = image.layers
    cached = await client.get(f"/v2/app/blobs/{sha256_digest(first)}")
    assert await cached.read() == first
    origin.chunk_delay = 0.002  # the second blob downloads while the first is sent
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    request = "GET /v2/app/blobs/{} HTTP/1.1\r\nHost: m\r\n\r\n"
    writer.write((request.format(sha256_digest(first)) + request.format(sha256_digest(second))).encode())
    try:
        for layer in (first, second):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
            assert await asyncio.wait_for(reader.readexactly(length), 10) == layer
    finally:
        writer.close()
