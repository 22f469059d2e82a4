"""Where the mirror sends its upstream credentials, and how it recovers from token realms
that fail (``proxy.registry.upstream.challenge``; issue 13 findings 6 and 8).

- Finding 8: ``auth_hosts`` compared host names only, so a realm on the upstream's host but
  another port got the upstream's password. Now a realm must be an allowed *origin*
  (scheme, host, port). Mounted against real Distribution with the real token issuer on
  another port of 127.0.0.1, and against a gate whose realm we choose, with the token
  issuer as the bait that must never see the credentials.
- Finding 6: one 401 whose realm was refused or unparsable made every later request fail
  without contacting the upstream, until restart. Now a challenge is remembered only once
  it produced credentials, and a failing token endpoint is backed off per realm, with expiry.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.errors import ConfigError, UpstreamDenied
from proxy.http.app import create_app
from proxy.registry.upstream.challenge import AuthOrigins, RealmBackoff, origin_of
from tests.support.aio import Client, ClientFactory, ServerFactory
from tests.support.images import ImageFactory
from tests.support.origin import Origin
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

PASSWORD_ENV = "PULLGATE_TEST_AUTH_ORIGIN_PASSWORD"


def basic_user(header: str | None) -> str | None:
    if not header or not header.startswith("Basic "):
        return None
    return base64.b64decode(header[6:]).decode().partition(":")[0]


# --- origins ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://auth.docker.io/token", ("https", "auth.docker.io", 443)),
        ("HTTPS://AUTH.Docker.IO:443/token", ("https", "auth.docker.io", 443)),
        ("http://127.0.0.1/token", ("http", "127.0.0.1", 80)),
        ("http://127.0.0.1:5000/token?scope=x", ("http", "127.0.0.1", 5000)),
        ("http://127.0.0.1:05000/token", ("http", "127.0.0.1", 5000)),
        ("http://[::1]:5000/token", ("http", "::1", 5000)),
        ("https://пример.рф/token", ("https", "xn--e1afmkfd.xn--p1ai", 443)),
        ("https://robot:pw@registry.example/token", None),  # credentials in the realm
        ("ftp://registry.example/token", None),
        ("file:///etc/passwd", None),
        ("//registry.example/token", None),
        ("http://[::1/token", None),  # unparsable
        ("http://registry.example:99999/token", None),
        ("http://127.0.0.1:5000\\@127.0.0.1:6000/token", None),  # parser differential bait
        ("//][@", None),  # yarl 1.25 raises IndexError for an empty host after '@' (found by fuzz_origin)
        ("http://x@/token", None),
        ("", None),
    ],
)
def test_origin_of(url: str, origin: tuple[str, str, int] | None) -> None:
    assert origin_of(url) == origin


UP_HTTP, UP_HTTPS = "http://127.0.0.1:5000", "https://registry.example"


@pytest.mark.parametrize(
    ("upstream", "auth_hosts", "realm", "allowed"),
    [
        (UP_HTTP, (), "http://127.0.0.1:5000/token", True),  # the upstream's own origin
        (UP_HTTP, (), "http://127.0.0.1:5001/token", False),  # finding 8: same host, other port
        (UP_HTTP, (), "http://127.0.0.1/token", False),
        (UP_HTTP, (), "https://127.0.0.1:5000/token", False),  # other scheme
        (UP_HTTP, (), "http://localhost:5000/token", False),  # another name for the host
        (UP_HTTP, (), "http://[::ffff:127.0.0.1]:5000/token", False),
        (UP_HTTPS, (), "https://registry.example/token", True),
        (UP_HTTPS, (), "https://registry.example:443/token", True),  # default port spelled out
        (UP_HTTPS, (), "https://registry.example:8443/token", False),
        (UP_HTTPS, (), "http://registry.example/token", False),  # no clear text for a TLS upstream
        ("https://registry-1.docker.io", (), "https://auth.docker.io/token", True),
        ("https://registry-1.docker.io", (), "https://auth.docker.io:8443/token", False),
        ("https://registry-1.docker.io", (), "http://auth.docker.io/token", False),
        (UP_HTTPS, ("auth.example",), "https://auth.example/token", True),
        (UP_HTTPS, ("auth.example",), "https://registry.example/token", False),  # auth_hosts replaces
        (UP_HTTPS, ("auth.example",), "https://auth.example:444/token", False),
        (UP_HTTPS, ("auth.example:8443",), "https://auth.example:8443/token", True),
        (UP_HTTPS, ("https://auth.example:8443",), "https://auth.example:8443/token", True),
        (UP_HTTPS, ("https://auth.example:8443",), "https://auth.example/token", False),
        (UP_HTTP, ("127.0.0.1:5001",), "http://127.0.0.1:5001/token", True),  # plain upstream: http too
        (UP_HTTP, ("127.0.0.1:5001",), "https://127.0.0.1:5001/token", True),
        (UP_HTTP, ("http://127.0.0.1:5001",), "http://127.0.0.1:5001/token", True),
        (UP_HTTP, ("http://127.0.0.1:5001",), "http://127.0.0.1:5002/token", False),
    ],
)
def test_auth_origins(upstream: str, auth_hosts: tuple[str, ...], realm: str, allowed: bool) -> None:
    well_known = ("auth.docker.io",) if "docker.io" in upstream else ()
    assert AuthOrigins(upstream, auth_hosts, well_known, "upstreams.x.auth_hosts").allows(realm) is allowed


@pytest.mark.parametrize(
    ("upstream", "entry", "error"),
    [
        (UP_HTTPS, "http://auth.example", "is plain http but the upstream uses https"),
        (UP_HTTPS, "ftp://auth.example", "is not an http(s) origin"),
        (UP_HTTPS, "https://robot:pw@auth.example", "is not an http(s) origin"),
        (UP_HTTPS, "auth.example:notaport", "is not a host or host:port"),
    ],
)
def test_bad_auth_hosts_name_the_key(upstream: str, entry: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        AuthOrigins(upstream, (entry,), (), "upstreams.ghcr.io.auth_hosts")
    assert info.value.message.startswith("upstreams.ghcr.io.auth_hosts: ") and error in info.value.message


async def test_backoff_doubles_is_per_realm_and_forgets_on_success() -> None:
    backoff = RealmBackoff(first=0.05, most=0.2)
    backoff.failed("https://a/token", UpstreamDenied("token endpoint answered 401"))
    backoff.failed("https://a/token", UpstreamDenied("a concurrent failure"))  # same outage: no extra step
    with pytest.raises(UpstreamDenied, match="answered 401") as info:
        backoff.check("https://a/token")
    assert info.value.headers == {"Retry-After": "1"}
    backoff.check("https://b/token")  # another realm is not affected
    await asyncio.sleep(0.06)
    backoff.check("https://a/token")  # expired
    backoff.failed("https://a/token", UpstreamDenied("again"))
    await asyncio.sleep(0.06)
    with pytest.raises(UpstreamDenied, match="again"):
        backoff.check("https://a/token")  # 0.1 s now
    backoff.succeeded("https://a/token")
    backoff.check("https://a/token")


def test_backoff_memory_is_bounded() -> None:
    """A hostile upstream naming a new realm on every 401 cannot grow the memory."""
    backoff = RealmBackoff()
    for i in range(1000):
        backoff.failed(f"https://registry.example/token?n={i}", UpstreamDenied("no"))
    backoff.check("https://registry.example/token?n=0")  # forgotten long ago
    with pytest.raises(UpstreamDenied):
        backoff.check("https://registry.example/token?n=999")
    assert len(backoff._failures) == 256


# --- a gate: an upstream whose Bearer realm the test chooses --------------------------------
@dataclass
class Gate:
    """The fault-knob origin behind a Bearer challenge naming ``realm``; its own ``/token``
    endpoint (same origin) records the Authorization it gets. It takes the tokens of the
    realm it names now: its own ``gate-token``, or any other (the issuer's JWTs)."""

    origin: Origin = field(default_factory=Origin)
    realm: str = ""
    seen: list[str] = field(default_factory=list)  # paths that reached the gate
    own_token_auth: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = self.origin.app()
        app.middlewares.append(self.challenge)
        app.router.add_get("/token", self.token)
        return app

    @web.middleware
    async def challenge(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/token":
            return await handler(request)
        self.seen.append(request.path)
        own_realm = origin_of(self.realm) == ("http", "127.0.0.1", request.url.port)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not token or token.startswith("Basic ") or (token == "gate-token") != own_realm:
            challenge = f'Bearer realm="{self.realm}",service="gate"' if self.realm else 'Bearer service="gate"'
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={
                "WWW-Authenticate": challenge})  # fmt: skip
        return await handler(request)

    async def token(self, request: web.Request) -> web.Response:
        self.own_token_auth.append(request.headers.get("Authorization"))
        return web.json_response({"token": "gate-token", "expires_in": 300})


@dataclass
class Setup:
    gate: Gate
    server: TestServer
    make: Callable[..., Awaitable[Client]]

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def setup(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Setup:
    monkeypatch.setenv(PASSWORD_ENV, "push-secret")  # the token server's user "pusher"
    gate = Gate()
    server = await aiohttp_server(gate.app())
    count = 0

    async def make(auth_hosts: tuple[str, ...] = ()) -> Client:
        nonlocal count
        count += 1
        upstream = UpstreamConfig("docker.io", str(server.make_url("")).rstrip("/"), "pusher", PASSWORD_ENV, auth_hosts)
        config = Config(
            cache=CacheConfig(dir=tmp_path / f"cache-{count}", tag_ttl=0.0, negative_ttl=0.0),
            upstreams=(upstream,),
            default_upstream="docker.io",
            timeouts=TimeoutConfig(connect=2, read=5, manifest=5, retries=0, backoff=0.01),
        )
        return await aiohttp_client(create_app(config))

    return Setup(gate, server, make)


async def get_status(client: Client, path: str) -> tuple[int, str | None]:
    response = await client.get(path)
    body = await response.json()
    return response.status, None if response.status == 200 else body["errors"][0]["code"]


@pytest.mark.parametrize(
    "realm",
    [
        "{token}/token",  # the token issuer: another port of the upstream's host
        "http://localhost:{token_port}/token",
        "http://[::ffff:127.0.0.1]:{token_port}/token",
        "https://127.0.0.1:{gate_port}/token",  # the upstream's port, another scheme
        "http://pusher:x@127.0.0.1:{gate_port}/token",  # credentials of its own in the realm
        "http://127.0.0.1:{gate_port}\\@127.0.0.1:{token_port}/token",
    ],
)
async def test_realm_off_the_upstreams_origin_never_gets_the_credentials(
    setup: Setup, token_server: TokenServer, realm: str
) -> None:
    setup.gate.origin.add_image("library/app", "1")
    setup.gate.realm = realm.format(token=token_server.url, token_port=token_server.port, gate_port=setup.server.port)
    client = await setup.make()
    before = token_server.request_count
    assert await get_status(client, "/v2/library/app/manifests/1") == (502, "UNAUTHORIZED")
    assert token_server.request_count == before, "the token issuer was contacted"
    assert setup.gate.own_token_auth == []


@pytest.mark.parametrize(
    "realm",
    ["{gate}/token", "HTTP://127.0.0.1:{gate_port}/token?extra=1", "http://127.0.0.1:0{gate_port}/token"],
)
async def test_realm_on_the_upstreams_origin_gets_them(setup: Setup, realm: str) -> None:
    setup.gate.origin.add_image("library/app", "1")
    setup.gate.realm = realm.format(gate=setup.url, gate_port=setup.server.port)
    client = await setup.make()
    assert await get_status(client, "/v2/library/app/manifests/1") == (200, None)
    assert [basic_user(a) for a in setup.gate.own_token_auth] == ["pusher"]


async def test_realm_listed_in_auth_hosts_by_origin(setup: Setup, token_server: TokenServer) -> None:
    setup.gate.origin.add_image("library/app", "1")
    setup.gate.realm = token_server.realm
    client = await setup.make(auth_hosts=(token_server.url,))
    before = token_server.request_count
    assert await get_status(client, "/v2/library/app/manifests/1") == (200, None)
    assert [r.user for r in token_server.requests[before:]] == ["pusher"]


@pytest.mark.parametrize(
    "bad_realm",
    [
        "{token}/token",  # refused (another origin)
        "http://[::1/token",  # unparsable
        "ftp://127.0.0.1:{gate_port}/token",
        "",  # a Bearer challenge without a realm
    ],
)
async def test_one_bad_challenge_does_not_lock_the_upstream_out(
    setup: Setup, token_server: TokenServer, bad_realm: str
) -> None:
    """Finding 6: after the upstream fixes its challenge, the next request works — no restart."""
    setup.gate.origin.add_image("library/app", "1")
    setup.gate.realm = bad_realm.format(token=token_server.url, gate_port=setup.server.port)
    client = await setup.make()
    for _ in range(2):
        assert await get_status(client, "/v2/library/app/manifests/1") == (502, "UNAUTHORIZED")
    assert len(setup.gate.seen) == 2, "every request asked the upstream"
    setup.gate.realm = f"{setup.url}/token"
    assert await get_status(client, "/v2/library/app/manifests/1") == (200, None)
    assert [basic_user(a) for a in setup.gate.own_token_auth] == ["pusher"]


async def test_failing_token_endpoint_is_backed_off_per_realm_and_retried(
    setup: Setup, token_server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real token issuer refuses the password: it is not asked again at once (the
    upstream still is), another realm works meanwhile, and after the backoff the fixed
    password gets a token — without a restart."""
    for tag in ("1", "2", "3", "4"):
        setup.gate.origin.add_image("library/app", tag)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password")
    setup.gate.realm = token_server.realm
    client = await setup.make(auth_hosts=(token_server.url, setup.url))
    before = token_server.request_count
    assert await get_status(client, "/v2/library/app/manifests/1") == (502, "UNAUTHORIZED")
    assert [r.status for r in token_server.requests[before:]] == [401]
    response = await client.get("/v2/library/app/manifests/2")
    assert response.status == 502 and response.headers["Retry-After"] == "1"
    assert "not asked again" in (await response.json())["errors"][0]["message"]
    assert token_server.request_count == before + 1, "backing off: the issuer was not asked again"
    assert setup.gate.seen.count("/v2/library/app/manifests/2") == 1, "the upstream was"
    # Per realm: the upstream's own token endpoint is not held back by the other's failure.
    monkeypatch.setenv(PASSWORD_ENV, "push-secret")
    setup.gate.realm = f"{setup.url}/token"
    assert await get_status(client, "/v2/library/app/manifests/3") == (200, None)
    # Back to the issuer: after the backoff (1 s) it is asked again, with the fixed password.
    setup.gate.realm = token_server.realm
    await asyncio.sleep(1.1)
    assert await get_status(client, "/v2/library/app/manifests/4") == (200, None)
    assert [(r.user, r.status) for r in token_server.requests[before + 1 :]] == [("pusher", 200)]


async def test_real_registry_realm_on_another_port_gets_nothing_until_listed(
    auth_registry: Registry,
    token_server: TokenServer,
    aiohttp_client: ClientFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack of finding 8 against Distribution: its realm is the token issuer on
    another port of 127.0.0.1. Without ``auth_hosts`` the issuer never hears from the
    mirror; listed by origin, the pull works."""
    user, password = token_server.creds
    monkeypatch.setenv(PASSWORD_ENV, password)
    image = image_factory.image("1", layers=[2_000])
    await auth_registry.apush(image.layout, "1", f"{repo}:1")

    async def mirror(auth_hosts: tuple[str, ...], name: str) -> Client:
        upstream = UpstreamConfig("docker.io", auth_registry.url, user, PASSWORD_ENV, auth_hosts)
        config = Config(
            cache=CacheConfig(dir=tmp_path / name),
            upstreams=(upstream,),
            default_upstream="docker.io",
            timeouts=TimeoutConfig(connect=2, read=10, manifest=10, retries=0, backoff=0.01),
        )
        return await aiohttp_client(create_app(config))

    before = token_server.request_count
    refused = await mirror((), "refused")
    for method in ("GET", "HEAD"):
        response = await refused.request(method, f"/v2/{repo}/manifests/1")
        assert response.status == 502
    response = await refused.get(f"/v2/{repo}/blobs/{image.layer_digests[0]}")
    assert response.status == 502
    assert token_server.request_count == before, "the issuer on another port got a request"
    listed = await mirror((token_server.url,), "listed")
    response = await listed.get(f"/v2/{repo}/manifests/1")
    assert response.status == 200 and response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert {r.user for r in token_server.requests[before:]} == {user}
