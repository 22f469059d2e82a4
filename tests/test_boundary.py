"""The error boundary (``proxy.http.boundary``) with real failures: an unexpected exception
in a handler answers in the spec's terms with a request id, leaves one ``unhandled_error``
event with the traceback, the usual ``http_request`` event and request metrics; once
headers are out the connection is cut short instead; a client that leaves is not an error;
the webhook never answers aiohttp's plain-text 500."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import socket
import struct
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.config.settings import AdmissionConfig, CacheConfig, Config, LogConfig, TimeoutConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS, MIRROR
from proxy.http.pullapi import prepare
from proxy.http.webhook_listener import serve_webhook
from proxy.oci.digest import Digest
from proxy.oci.reference import ImageReference
from proxy.ops.logs import configure_logging
from proxy.ops.metrics import Metrics
from proxy.registry.manifests import Resolution
from tests.support.aio import Client, ClientFactory
from tests.support.daemon import Daemon, OriginThread
from tests.support.images import sha256_digest
from tests.support.origin import Origin
from tests.support.polling import eventually
from tests.support.procs import wait_until

DATA = Path(__file__).parent / "data"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def mirror(
    origin: tuple[Origin, TestServer], aiohttp_client: ClientFactory, tmp_path: Path
) -> tuple[Client, Origin]:
    state, server = origin
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", str(server.make_url("")).rstrip("/")),),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=2, read=5, manifest=5, retries=0, backoff=0.01),
    )
    app = create_app(config)

    async def headers_then_bug(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 1000
        await prepare(request, response)  # how the mirror's handlers send streamed headers
        await response.write(b"x" * 100)
        raise RuntimeError("a bug after the headers went out")

    app.router.add_get("/v2/test/after-headers", headers_then_bug, name="after_headers")
    return await aiohttp_client(app), state


async def cached_blob(client: Client, origin: Origin, size: int) -> tuple[str, Path]:
    image = origin.add_image("library/app", "1", layers=[size])
    digest = sha256_digest(image.layers[0])
    assert await (await client.get(f"/v2/app/blobs/{digest}")).read() == image.layers[0]
    store = client.app[MIRROR].store
    await eventually(lambda: store.size(Digest.parse(digest)) == size)
    # The file is in place before the download records it and lets go of it (later GETs
    # would join the download, not read the file): wait for that too.
    await eventually(lambda: not client.app[MIRROR].blobs.in_flight())
    # The client has every byte before the handler returns: wait until this request has
    # been logged and counted, so it does not land in the next test step's logs.
    registry = client.app[METRICS].registry
    labels = {"endpoint": "blob", "method": "GET", "status": "200"}
    await eventually(lambda: sample(registry, "pullgate_http_requests_total", **labels) >= 1)
    return digest, store.path(Digest.parse(digest))


async def test_unexpected_exception_in_a_handler_answers_in_spec_terms(mirror: tuple[Client, Origin]) -> None:
    client, origin = mirror
    digest, path = await cached_blob(client, origin, 4096)
    # The cached file became a directory (a broken disk, an operator's mistake): opening
    # it raises IsADirectoryError, which no handler expects.
    path.unlink()
    path.mkdir()
    with structlog.testing.capture_logs() as logs:
        response = await client.get(f"/v2/app/blobs/{digest}", headers={"X-Request-Id": "req-42"})
        body = await response.json()
    assert response.status == 500
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.headers["X-Request-Id"] == "req-42"
    message = "internal error (request id req-42); the mirror's log has the details"
    assert body == {"errors": [{"code": "UNKNOWN", "message": message}]}
    assert [e["event"] for e in logs] == ["unhandled_error", "http_request"]
    error, request = logs
    assert isinstance(error["exc_info"], IsADirectoryError)
    assert (error["request_id"], error["endpoint"], error["log_level"]) == ("req-42", "blob", "error")
    assert (request["status"], request["endpoint"], request["request_id"]) == (500, "blob", "req-42")
    registry = client.app[METRICS].registry
    assert sample(registry, "pullgate_http_requests_total", endpoint="blob", method="GET", status="500") == 1
    assert sample(registry, "pullgate_http_request_duration_seconds_count", endpoint="blob") == 2
    assert sample(registry, "pullgate_unhandled_errors_total", listener="mirror") == 1


async def test_after_the_headers_the_connection_is_cut_short(mirror: tuple[Client, Origin]) -> None:
    client, _ = mirror
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/v2/test/after-headers")
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert response.status == 200  # what was on the wire already
    assert [e["event"] for e in logs] == ["unhandled_error", "http_request"]
    assert isinstance(logs[0]["exc_info"], RuntimeError)
    assert (logs[1]["status"], logs[1]["aborted"]) == (200, "INTERNAL_ERROR")
    registry = client.app[METRICS].registry
    assert sample(registry, "pullgate_unhandled_errors_total", listener="mirror") == 1
    assert sample(registry, "pullgate_http_requests_total", endpoint="after_headers", method="GET", status="200") == 1


@pytest.mark.parametrize("source", ["cache", "download"])
async def test_a_client_that_leaves_mid_blob_is_not_an_error(mirror: tuple[Client, Origin], source: str) -> None:
    """No traceback and no ``unhandled_error``: one ``http_request`` saying CLIENT_GONE,
    whether the blob came by sendfile from the cache or streamed from a running download."""
    client, origin = mirror
    if source == "cache":
        digest, _ = await cached_blob(client, origin, 32 << 20)
    else:
        image = origin.add_image("library/app", "1", layers=[8 << 20])
        digest = sha256_digest(image.layers[0])
        origin.chunk_delay = 0.01  # the download is still running when the client leaves
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        await reader.readexactly(1 << 16)  # headers and the first bytes: the transfer is running
        writer.transport.abort()
        await eventually(lambda: any(e["event"] == "http_request" for e in logs), timeout=10)
    events = [e for e in logs if e["event"] in ("http_request", "unhandled_error")]
    assert [(e["event"], e["status"], e.get("aborted")) for e in events] == [("http_request", 200, "CLIENT_GONE")]
    assert sample(client.app[METRICS].registry, "pullgate_unhandled_errors_total", listener="mirror") == 0


# --- the webhook ---------------------------------------------------------------------------------
class BrokenResolver:
    """A tag resolver with a bug: what escapes it is no ``PullgateError``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def resolve(self, ref: ImageReference) -> Resolution:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (KeyError("docker.io/library/nginx"), 500, "UNKNOWN"),
        (AttributeError("'NoneType' object has no attribute 'digest'"), 500, "UNKNOWN"),
        (RecursionError("maximum recursion depth exceeded"), 500, "UNKNOWN"),
    ],
)
async def test_webhook_never_answers_a_plain_500(error: BaseException, status: int, code: str) -> None:
    """``/mutate`` resolves the pod's tags (namespace ``prod`` requires digests): the bug
    surfaces in the middle of the evaluation."""
    metrics = Metrics(CollectorRegistry())
    config = dataclasses.replace(
        Config(),
        policies=DATA / "policies" / "webhook",
        admission=dataclasses.replace(AdmissionConfig(), listen=("127.0.0.1", 0)),
    )
    review: dict[str, Any] = json.loads((DATA / "admission" / "pod-create.json").read_text())
    with structlog.testing.capture_logs() as logs:
        async with serve_webhook(config, BrokenResolver(error), metrics, structlog.get_logger()) as server:
            await eventually(lambda: any(e["event"] == "policies_loaded" for e in logs))
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{server.port}/mutate"
                async with session.post(url, json=review) as response:
                    body = await response.json()
                    content_type = response.headers["Content-Type"]
    assert response.status == status and content_type.startswith("application/json")
    assert body["errors"][0]["code"] == code
    assert body["errors"][0]["message"].startswith("internal error (request id ")
    errors = [e for e in logs if e["event"] == "unhandled_error"]
    assert len(errors) == 1 and errors[0]["exc_info"] is error
    assert [e["status"] for e in logs if e["event"] == "admission_review_rejected"] == [500]
    assert sample(metrics.registry, "pullgate_admission_reviews_total", endpoint="mutate", outcome="error") == 1
    assert sample(metrics.registry, "pullgate_admission_review_duration_seconds_count", endpoint="mutate") == 1
    assert sample(metrics.registry, "pullgate_unhandled_errors_total", listener="admission") == 1



def test_the_daemon_logs_no_traceback_when_a_client_leaves(tmp_path: Path) -> None:
    """The real server does not cancel handlers when a client leaves (unlike the test
    server): the write to the closed connection fails, and that is CLIENT_GONE too."""
    origin = Origin(chunk_delay=0.01)
    image = origin.add_image("library/app", "1", layers=[8 << 20])
    digest = sha256_digest(image.layers[0])
    with OriginThread(origin) as upstream, Daemon(tmp_path, upstream.url) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            received = 0
            while received < 1 << 16:
                received += len(sock.recv(1 << 16))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        assert daemon.proc is not None
        wait_until(
            lambda: any(e.get("event") == "http_request" and e.get("aborted") for e in daemon.events()),
            timeout=15, what="the http_request event", proc=daemon.proc, log=daemon.log,
        )  # fmt: skip
    requests = [e for e in daemon.events() if e.get("event") == "http_request"]
    assert [(e["status"], e["aborted"]) for e in requests] == [(200, "CLIENT_GONE")]
    assert "Traceback" not in daemon.log.read_text()
    assert not [e for e in daemon.events() if e.get("event") == "unhandled_error"]


@pytest.mark.parametrize(
    ("level", "expected_events"),
    [("info", ["http_request"]), ("warning", [])],
)
async def test_the_request_event_follows_the_log_level(
    mirror: tuple[Client, Origin], level: Literal["info", "warning"], expected_events: list[str]
) -> None:
    """The ``http_request`` event is built only when info is emitted, and emitted when it is."""
    client, _ = mirror
    saved = structlog.get_config()
    out = io.StringIO()
    try:
        configure_logging(LogConfig(level=level, format="json"), stream=out)
        assert (await client.get("/v2/")).status == 200
    finally:
        structlog.configure(**saved)
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert [e for e in events if e == "http_request"] == expected_events


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/", 200),
        ("/healthz", 200),
        ("/metrics", 200),
        ("/v2/app/manifests/1", 200),
        ("/v2/app/blobs/{digest}", 200),  # streamed: headers out before the handler returns
        ("/v2/app/manifests/nosuch", 404),  # the spec's error body
        ("/v2/app/nosuch-endpoint", 404),  # unrouted under /v2/: a spec-shaped body too
        ("/nosuch", 404),  # aiohttp's own answer
        ("/v2/a%2Fb/manifests/1", 400),  # refused before routing (an encoded separator)
        ("/v2/test/after-headers", 200),  # cut short after the headers
    ],
)
async def test_every_response_carries_the_request_id(
    mirror: tuple[Client, Origin], path: str, status: int
) -> None:
    client, origin = mirror
    image = origin.add_image("library/app", "1", layers=[1000])
    path = path.format(digest=sha256_digest(image.layers[0]))
    async with client.get(path, headers={"X-Request-Id": "req-7"}) as response:
        assert (response.status, response.headers.get("X-Request-Id")) == (status, "req-7")


def test_streamed_headers_go_out_only_through_pullapi_prepare() -> None:
    """The boundary learns that headers are out from ``pullapi.prepare`` (no signal): a
    handler calling ``response.prepare`` itself would, on a later error, have a second
    response written after the first one's headers."""
    root = Path(__file__).parent.parent / "proxy"
    calls = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".prepare(request)" in line
    ]
    assert [call.partition(":")[0] for call in calls] == ["http/pullapi.py"], calls  # in prepare itself


async def test_request_ids_are_unique_and_short_unless_the_client_sent_one(mirror: tuple[Client, Origin]) -> None:
    client, _ = mirror
    ids = [(await client.get("/v2/")).headers["X-Request-Id"] for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(0 < len(i) <= 64 for i in ids)
    sent = "x" * 100
    assert (await client.get("/v2/", headers={"X-Request-Id": sent})).headers["X-Request-Id"] == sent[:64]
