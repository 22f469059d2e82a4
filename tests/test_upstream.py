"""The upstream client against small real aiohttp servers on loopback that behave like
registries in the ways that matter here: token challenges, flaky 5xx, 429, redirects."""

from __future__ import annotations

import base64

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.config.settings import TimeoutConfig, UpstreamConfig
from proxy.errors import PullgateError, UpstreamDenied, UpstreamError, UpstreamRateLimited, UpstreamUnavailable
from proxy.ops.metrics import Metrics
from proxy.registry.upstream.client import RegistryClient
from tests.support.aio import ServerFactory

BASIC_UP = "Basic " + base64.b64encode(b"u:p").decode()
FAST = TimeoutConfig(connect=2, read=2, manifest=2, retries=2, backoff=0.01)


class Upstream:
    """A registry-shaped app recording what it was sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.token_requests: list[dict[str, str]] = []
        self.fail_first = 0
        self.status_after_failures = 200
        self.mode = "open"  # open | bearer | basic
        self.realm = ""
        self.redirect_to: str | None = None
        self.headers: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self.registry)
        app.router.add_get("/token", self.token)
        app.router.add_get("/cdn/{tail:.*}", self.cdn)
        return app

    async def registry(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.seen.append((request.method, request.path, auth))
        if self.mode == "bearer" and auth != "Bearer good-token":
            challenge = f'Bearer realm="{self.realm}",service="test-registry"'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={"WWW-Authenticate": challenge}
            )
        if self.mode == "basic" and auth != BASIC_UP:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=self.status_after_failures, headers=self.headers)
        if self.redirect_to:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(
            body=b"payload", headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "42;w=21600"}
        )

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(request.query) | {"auth": request.headers.get("Authorization", "")})
        if request.headers.get("Authorization") != BASIC_UP:
            return web.json_response({"token": "anonymous"})
        return web.json_response({"token": "good-token", "expires_in": 300})

    async def cdn(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        return web.Response(body=b"from-cdn")


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> tuple[Upstream, TestServer]:
    state = Upstream()
    server = await aiohttp_server(state.app())
    state.realm = str(server.make_url("/token"))
    return state, server


async def client_for(
    server: TestServer, metrics: Metrics, **extra: object
) -> tuple[RegistryClient, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    config = UpstreamConfig(name="up", url=str(server.make_url("")).rstrip("/"), **extra)  # type: ignore[arg-type]
    return RegistryClient(config, session, FAST, metrics), session


async def test_bearer_flow_with_credentials_and_token_cache(
    upstream: tuple[Upstream, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, server = upstream
    state.mode = "bearer"
    monkeypatch.setenv("UP_PASSWORD", "p")
    metrics = Metrics(CollectorRegistry())
    client, session = await client_for(server, metrics, username="u", password_env="UP_PASSWORD")
    async with session:
        first = await client.fetch("GET", "library/app", "manifests/1", max_size=100)
        second = await client.fetch("GET", "library/app", "manifests/2", max_size=100)
    assert first.status == second.status == 200 and first.body == b"payload"
    assert len(state.token_requests) == 1, "token is cached per scope"
    assert state.token_requests[0]["scope"] == "repository:library/app:pull"
    assert state.token_requests[0]["service"] == "test-registry"
    # One challenge, then every request carries the token.
    assert [auth for _, _, auth in state.seen] == [None, "Bearer good-token", "Bearer good-token"]
    assert metrics.registry.get_sample_value("pullgate_upstream_ratelimit_remaining", {"upstream": "up"}) == 42


async def test_wrong_credentials_are_denied(upstream: tuple[Upstream, TestServer]) -> None:
    state, server = upstream
    state.mode = "bearer"
    client, session = await client_for(server, Metrics(CollectorRegistry()))
    async with session:
        with pytest.raises(UpstreamDenied, match="refused our credentials"):
            await client.fetch("GET", "library/app", "manifests/1", max_size=100)


async def test_basic_challenge(upstream: tuple[Upstream, TestServer], monkeypatch: pytest.MonkeyPatch) -> None:
    state, server = upstream
    state.mode = "basic"
    monkeypatch.setenv("UP_PASSWORD", "p")
    client, session = await client_for(server, Metrics(CollectorRegistry()), username="u", password_env="UP_PASSWORD")
    async with session:
        response = await client.fetch("GET", "x", "manifests/1", max_size=100)
    assert response.status == 200


async def test_realm_on_disallowed_host_is_not_contacted(upstream: tuple[Upstream, TestServer]) -> None:
    state, server = upstream
    state.mode = "bearer"
    state.realm = "http://127.0.0.9:1/token"
    client, session = await client_for(server, Metrics(CollectorRegistry()), auth_hosts=("auth.example",))
    async with session:
        with pytest.raises(UpstreamDenied, match="realm host is not allowed"):
            await client.fetch("GET", "x", "manifests/1", max_size=100)
    assert state.token_requests == []


@pytest.mark.parametrize(
    ("failures", "status", "headers", "error"),
    [
        (2, 503, {}, None),  # retried, then fine
        (3, 503, {}, UpstreamUnavailable),  # retries exhausted
        (1, 429, {"Retry-After": "0"}, None),  # short Retry-After: waited and retried
        (1, 429, {"Retry-After": "120"}, UpstreamRateLimited),  # long one goes back to the client
        (1, 404, {}, None),  # not an error for the client layer: the caller maps 404
    ],
)
async def test_retries(
    upstream: tuple[Upstream, TestServer],
    failures: int,
    status: int,
    headers: dict[str, str],
    error: type[PullgateError] | None,
) -> None:
    state, server = upstream
    state.fail_first, state.status_after_failures, state.headers = failures, status, headers
    client, session = await client_for(server, Metrics(CollectorRegistry()))
    async with session:
        if error is not None:
            with pytest.raises(error) as info:
                await client.fetch("GET", "x", "manifests/1", max_size=100)
            if status == 429:
                assert info.value.headers == {"Retry-After": "120"}
            return
        response = await client.fetch("GET", "x", "manifests/1", max_size=100)
    assert response.status == (404 if status == 404 else 200)


async def test_connect_error_is_unavailable() -> None:
    metrics = Metrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(UpstreamConfig(name="down", url="http://127.0.0.1:9"), session, FAST, metrics)
        with pytest.raises(UpstreamUnavailable, match="unreachable"):
            await client.fetch("GET", "x", "manifests/1", max_size=100)
    assert (
        metrics.registry.get_sample_value("pullgate_upstream_errors_total", {"upstream": "down", "kind": "connect"})
        == 3
    )


async def test_redirect_drops_credentials(
    upstream: tuple[Upstream, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, server = upstream
    state.mode = "bearer"
    state.redirect_to = str(server.make_url("/cdn/blob"))
    monkeypatch.setenv("UP_PASSWORD", "p")
    client, session = await client_for(server, Metrics(CollectorRegistry()), username="u", password_env="UP_PASSWORD")
    async with session, client.open("GET", "x", "blobs/sha256:" + "0" * 64) as response:
        assert await response.read() == b"from-cdn"
    assert state.seen[-1] == ("GET", "/cdn/blob", None)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("http://169.254.169.254/latest/meta-data", "disallowed location"),
        ("http://127.0.0.2:1/x", "disallowed location"),
        ("ftp://example/x", "disallowed location"),
        ("http://[::1", "unparsable Location"),  # a hostile upstream's Location is a 502, never a 500
        ("http://a:99999/x", "unparsable Location"),
        ("//][@", "unparsable Location"),
    ],
)
async def test_redirect_to_plain_http_elsewhere_is_refused(
    upstream: tuple[Upstream, TestServer], target: str, error: str
) -> None:
    state, server = upstream
    state.redirect_to = target
    client, session = await client_for(server, Metrics(CollectorRegistry()))
    async with session:
        with pytest.raises(UpstreamError, match=error):
            async with client.open("GET", "x", "blobs/sha256:" + "0" * 64):
                pass


async def test_oversized_response_is_refused(upstream: tuple[Upstream, TestServer]) -> None:
    _, server = upstream
    client, session = await client_for(server, Metrics(CollectorRegistry()))
    async with session:
        with pytest.raises(PullgateError, match="exceeds"):
            await client.fetch("GET", "x", "manifests/1", max_size=3)
