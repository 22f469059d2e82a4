"""Input and concurrency limits (config ``limits``, ``proxy.ops.limits``): header and URL sizes,
manifest and AdmissionReview sizes, concurrent upstream fetches per client and overall,
and slow clients — a slowloris is closed, a slow reader slows only itself, a stalled one
is cut off, and none of them holds up the download that fills the cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from proxy.admission.webhook import create_webhook_app
from proxy.config.settings import AdmissionConfig, CacheConfig, Config, LimitsConfig, TimeoutConfig, UpstreamConfig
from proxy.errors import UpstreamRateLimited
from proxy.http.appkeys import METRICS, MIRROR
from proxy.oci.digest import Digest
from proxy.ops.limits import FETCH_CLIENT, FailureWindow, FetchLimiter, client_key
from proxy.ops.metrics import Metrics
from tests.support.aio import Client, ClientFactory
from tests.support.images import sha256_digest
from tests.support.origin import Origin, StartMirror
from tests.support.polling import eventually
from tests.support.resolver import DictResolver

Mirror = tuple[Client, Origin]




@pytest.fixture
def make_mirror(
    start_mirror: StartMirror, origin_url: str, tmp_path: Path
) -> Callable[..., Awaitable[Mirror]]:
    async def make(cache: dict[str, Any] | None = None, **limits: Any) -> Mirror:
        config = Config(
            cache=CacheConfig(dir=tmp_path / "cache", **(cache or {})),
            upstreams=(UpstreamConfig("docker.io", origin_url),),
            default_upstream="docker.io",
            timeouts=TimeoutConfig(connect=2, read=10, manifest=5, retries=0, backoff=0.01),
            limits=LimitsConfig(**limits),
        )
        return await start_mirror(config)

    return make


async def raw(client: Client, request: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --- sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_text", "status"),
    [
        ("GET /v2/app/manifests/1 HTTP/1.1\r\nHost: m\r\nX-Big: " + "a" * 2000 + "\r\n\r\n", 200),
        ("GET /v2/app/manifests/1 HTTP/1.1\r\nHost: m\r\nX-Big: " + "a" * 5000 + "\r\n\r\n", 400),
        ("GET /v2/app/manifests/1 HTTP/1.1\r\nHost: m\r\n" + "X-H: 1\r\n" * 40 + "\r\n", 400),
        ("GET /v2/" + "a/" * 700 + "app/manifests/1 HTTP/1.1\r\nHost: m\r\n\r\n", 400),  # URL > max_url_length
        ("GET /v2/" + "a" * 10_000 + "/manifests/1 HTTP/1.1\r\nHost: m\r\n\r\n", 400),  # past the parser's line
    ],
)
async def test_header_and_url_limits(
    make_mirror: Callable[..., Awaitable[Mirror]], request_text: str, status: int
) -> None:
    client, origin = await make_mirror(max_header_size=4096, max_headers=32, max_url_length=1024)
    origin.add_image("library/app", "1")
    response = await raw(client, request_text.replace("HTTP/1.1\r\n", "HTTP/1.1\r\nConnection: close\r\n", 1).encode())
    assert status_of(response) == status
    if status != 200:
        assert sum(origin.requests.values()) == 0


async def test_manifest_size_limit(make_mirror: Callable[..., Awaitable[Mirror]]) -> None:
    client, origin = await make_mirror(cache={"max_manifest_size": 1024})
    origin.put_manifest("library/app", "big", "application/vnd.oci.image.manifest.v1+json", b"{" + b" " * 2048 + b"}")
    response = await client.get("/v2/app/manifests/big")
    assert response.status == 502 and (await response.json())["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_admission_review_size_limit(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    config = Config(cache=CacheConfig(dir=tmp_path / "cache"), admission=AdmissionConfig(max_body_size=4096))
    app = create_webhook_app(config, DictResolver(), Metrics(CollectorRegistry()), structlog.get_logger())
    client = await aiohttp_client(app)
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "pad": "x" * 8192})
    response = await client.post("/validate", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 413 and (await response.json())["errors"][0]["code"] == "SIZE_INVALID"


# --- concurrent upstream fetches -------------------------------------------------------------
@pytest.mark.parametrize(
    ("limits", "scope"),
    [
        ({"upstream_fetches_per_client": 2}, "client"),
        ({"upstream_fetches": 2, "upstream_fetches_per_client": 10}, "overall"),
    ],
)
async def test_cold_fetches_over_the_limit_get_429(
    make_mirror: Callable[..., Awaitable[Mirror]], limits: dict[str, int], scope: str
) -> None:
    client, origin = await make_mirror(**limits)
    image = origin.add_image("library/app", "1", layers=[1 << 20, 1 << 20, 1 << 20])
    assert (await client.get("/v2/app/manifests/1")).status == 200  # as clients do: blobs are then known
    origin.chunk_delay = 0.02  # 16 chunks: each download runs ~0.3 s
    digests = [sha256_digest(layer) for layer in image.layers]
    first = [await client.get(f"/v2/app/blobs/{d}") for d in digests[:2]]
    assert [r.status for r in first] == [200, 200]
    refused = await client.get(f"/v2/app/blobs/{digests[2]}")
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert (await refused.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    labels = {"scope": scope}
    assert client.app[METRICS].registry.get_sample_value("pullgate_fetch_limit_rejections_total", labels) == 1
    # Joining a running download starts no fetch: never refused.
    joined = await client.get(f"/v2/app/blobs/{digests[0]}")
    assert joined.status == 200
    for response, layer in zip([*first, joined], [*image.layers[:2], image.layers[0]], strict=True):
        assert await response.read() == layer
    await wait_until_cached(client, digests[:2])
    retried = await client.get(f"/v2/app/blobs/{digests[2]}")  # what containerd does after a 429
    assert retried.status == 200 and await retried.read() == image.layers[2]


async def wait_until_cached(client: Client, digests: list[str]) -> None:
    store = client.app[MIRROR].store
    for _ in range(300):
        if all(store.size(Digest.parse(d)) is not None for d in digests):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("downloads did not finish")


async def test_fetch_limiter_counts_per_client() -> None:
    metrics = Metrics(CollectorRegistry())
    limiter = FetchLimiter(3, 1, metrics)

    async def fetch(client: str | None, hold: asyncio.Event) -> None:
        FETCH_CLIENT.set(client)
        with limiter.permit():
            await hold.wait()

    hold = asyncio.Event()
    running = [asyncio.create_task(fetch(c, hold)) for c in ("10.0.0.1", "10.0.0.2", None)]
    await asyncio.sleep(0)
    assert limiter.active == 3
    FETCH_CLIENT.set("10.0.0.3")
    with pytest.raises(UpstreamRateLimited, match="overall limit"), limiter.permit():
        pass
    hold.set()
    await asyncio.gather(*running)
    assert limiter.active == 0
    FETCH_CLIENT.set("10.0.0.1")
    with limiter.permit(), pytest.raises(UpstreamRateLimited, match="client limit"), limiter.permit():
        pass


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),  # rotating within a /64 does not reset a limit
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_client_key(remote: str | None, key: str) -> None:
    assert client_key(remote) == key


def test_failure_window() -> None:
    window = FailureWindow(limit=2, window=0.2)
    assert window.retry_after("a") == 0
    window.record("a")
    assert window.retry_after("a") == 0
    window.record("a")
    assert 0 < window.retry_after("a") <= 0.2
    assert window.retry_after("b") == 0
    time.sleep(0.25)
    assert window.retry_after("a") == 0


# --- slow clients -----------------------------------------------------------------------------
async def test_slowloris_headers_are_cut_off(make_mirror: Callable[..., Awaitable[Mirror]]) -> None:
    client, _ = await make_mirror(idle_timeout=1.0)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    started = time.monotonic()
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n")
    closed = False
    for _ in range(40):  # a header byte every 0.1 s, never finishing the request
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof():
            closed = True
            break
        try:
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed = True
                break
        except TimeoutError:
            continue
    writer.close()
    assert closed and time.monotonic() - started < 3.0


async def test_slow_reader_holds_up_neither_the_cache_fill_nor_other_clients(
    make_mirror: Callable[..., Awaitable[Mirror]],
) -> None:
    client, origin = await make_mirror()
    image = origin.add_image("library/app", "1", layers=[8 << 20])
    layer, digest = image.layers[0], sha256_digest(image.layers[0])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.server.host, client.server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
    received = 0
    fast_started = None
    try:
        for tick in range(30):  # ~1 byte per 0.05 s
            received += len(await reader.read(1))
            await asyncio.sleep(0.05)
            if tick == 5:
                fast_started = time.monotonic()
                other = await client.get(f"/v2/app/blobs/{digest}")
                assert await other.read() == layer
                fast_elapsed = time.monotonic() - fast_started
        assert client.app[MIRROR].store.size(Digest.parse(digest)) == len(layer), "the cache fill finished"
        assert fast_elapsed < 2.0
        assert received < 64
        assert origin.count("GET", f"/blobs/{digest}") == 1
    finally:
        writer.close()


async def test_stalled_reader_is_cut_off_after_send_timeout(make_mirror: Callable[..., Awaitable[Mirror]]) -> None:
    client, origin = await make_mirror(send_timeout=0.5)
    image = origin.add_image("library/app", "1", layers=[24 << 20])
    digest = sha256_digest(image.layers[0])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.server.host, client.server.port))
    _reader, writer = await asyncio.open_connection(sock=sock)
    with structlog.testing.capture_logs() as logs:
        writer.write(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        for _ in range(100):  # never read: the mirror's socket buffers fill, then it waits
            if any(e.get("aborted") == "SEND_TIMEOUT" for e in logs):
                break
            await asyncio.sleep(0.05)
    writer.close()
    aborted = [e for e in logs if e["event"] == "http_request" and e.get("aborted")]
    assert [e["aborted"] for e in aborted] == ["SEND_TIMEOUT"]
    await wait_until_cached(client, [digest])  # the download itself went on


def open_files(path: Path) -> int:
    """How many of this process's descriptors have ``path`` open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


@pytest.mark.parametrize(("range_header", "status"), [(None, 200), ("bytes=1000-", 206)])
async def test_stalled_reader_of_a_cached_blob_is_cut_off_and_its_file_closed(
    make_mirror: Callable[..., Awaitable[Mirror]], range_header: str | None, status: int
) -> None:
    """The cached path (sendfile) is bounded like the streaming one: a client that stops
    reading loses its connection and the blob's file descriptor within send_timeout of the
    socket buffers filling up."""
    send_timeout = 0.5
    client, origin = await make_mirror(send_timeout=send_timeout)
    image = origin.add_image("library/app", "1", layers=[48 << 20])
    digest = sha256_digest(image.layers[0])
    assert len(await (await client.get(f"/v2/app/blobs/{digest}")).read()) == 48 << 20
    await wait_until_cached(client, [digest])
    path = client.app[MIRROR].store.path(Digest.parse(digest))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.server.host, client.server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    extra = f"Range: {range_header}\r\n" if range_header else ""
    with structlog.testing.capture_logs() as logs:
        writer.write(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: m\r\n{extra}\r\n".encode())
        started = time.monotonic()
        # The send is under way: the response's file and the sender thread's duplicate.
        await eventually(lambda: open_files(path) == 2, timeout=5)
        held = open_files(path)
        # Never read: the mirror's socket buffers fill, then its send waits.
        await eventually(lambda: any(e["event"] == "http_request" for e in logs), timeout=15, step=0.05)
        cut_after = time.monotonic() - started
        await eventually(lambda: open_files(path) == 0, timeout=2)
    received = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):  # the connection is closed: reading ends instead of waiting
            while chunk := await reader.read(1 << 20):
                received += chunk
    writer.close()
    assert held == 2
    (event,) = [e for e in logs if e["event"] == "http_request"]
    assert (event["status"], event["aborted"], event["cache"]) == (status, "SEND_TIMEOUT", "hit")
    assert event["bytes"] < 48 << 20
    assert len(received) < 48 << 20
    assert cut_after < send_timeout + 4.5, f"cut off after {cut_after:.1f}s with send_timeout {send_timeout}s"
