"""The mirror cannot be turned into an SSRF gadget: only configured upstreams are contacted,
token realms only on allowed hosts, redirects only to https hosts whose addresses pass
``proxy.registry.upstream.netguard`` — never loopback, link-local or private addresses the upstream does not
live on — and client-supplied hosts (``ns``, path prefixes) never.

Every test runs under ``outbound``: each connect the process makes is recorded, and any to
a non-loopback address is refused before a packet leaves (so a regression here cannot
send traffic off this machine). Bait listeners on other loopback addresses count the
connections they get: none may get any."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.errors import UpstreamError
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS
from proxy.ops.metrics import Metrics
from proxy.registry.upstream import netguard
from proxy.registry.upstream.client import RegistryClient
from tests.support.aio import Client, ClientFactory, ServerFactory
from tests.support.images import sha256_digest

BLOB = b"blob-bytes" * 100
BLOB_DIGEST = sha256_digest(BLOB)


# --- the safety net and the bait -----------------------------------------------------------
@dataclass
class Outbound:
    attempts: list[tuple[str, int]] = field(default_factory=list)

    def off_loopback(self) -> list[tuple[str, int]]:
        return [a for a in self.attempts if not ipaddress.ip_address(a[0]).is_loopback]


@pytest.fixture(autouse=True)
def outbound(monkeypatch: pytest.MonkeyPatch) -> Iterator[Outbound]:
    record = Outbound()
    original = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def guarded(self: asyncio.AbstractEventLoop, sock: socket.socket, address: Any) -> None:
        host, port = str(address[0]), int(address[1])
        record.attempts.append((host, port))
        if not ipaddress.ip_address(host.partition("%")[0]).is_loopback:
            raise OSError(f"test guard: refused to connect to {host}:{port}")
        await original(self, sock, address)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", guarded)
    yield record
    assert record.off_loopback() == [], "the mirror tried to connect off loopback"


# Names the redirect tests use; any other name does not resolve. No real DNS query leaves.
FAKE_DNS = {
    "bait.example": ["127.0.0.2"],
    "metadata.example": ["169.254.169.254"],
    "intranet.example": ["10.1.2.3"],
    "rebind.example": ["93.184.216.34", "127.0.0.2"],  # one public answer does not launder the other
}


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = netguard.resolve

    async def resolve(host: str, port: int, timeout: float) -> list[netguard.IPAddress]:
        if netguard.literal(host) is not None:
            return await real(host, port, timeout)
        if host not in FAKE_DNS:
            raise OSError(f"{host}: name does not resolve (test DNS)")
        return [ipaddress.ip_address(a) for a in FAKE_DNS[host]]

    monkeypatch.setattr(netguard, "resolve", resolve)


@dataclass
class Bait:
    host: str
    port: int
    connections: int = 0

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@pytest.fixture
async def bait() -> AsyncIterator[Callable[[str], Awaitable[Bait]]]:
    """``await bait("127.0.0.2")``: a listener that counts connections and answers nothing."""
    servers: list[asyncio.Server] = []

    async def make(host: str) -> Bait:
        found = Bait(host, 0)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            found.connections += 1
            writer.close()

        server = await asyncio.start_server(accept, host, 0)
        servers.append(server)
        found.port = server.sockets[0].getsockname()[1]
        return found

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


# --- a registry with hostile answers --------------------------------------------------------
@dataclass
class Hostile:
    realm: str | None = None  # answer 401 with this Bearer realm
    redirect: str | None = None  # redirect blob GETs here
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self.handle)
        app.router.add_get("/cdn/{tail:.*}", self.cdn)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization")))
        if self.realm is not None:
            return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{self.realm}",service="x"'})
        if self.redirect is not None and "/blobs/" in request.path:
            return web.Response(status=307, headers={"Location": self.redirect})
        if "/blobs/" in request.path:
            return web.Response(body=BLOB)
        return web.json_response({})

    async def cdn(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, request.headers.get("Authorization")))
        return web.Response(body=BLOB)


@pytest.fixture
async def hostile(aiohttp_server: ServerFactory) -> tuple[Hostile, TestServer]:
    state = Hostile()
    return state, await aiohttp_server(state.app())


@pytest.fixture
async def mirror(
    hostile: tuple[Hostile, TestServer], aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Client:
    _, server = hostile
    monkeypatch.setenv("PULLGATE_TEST_SSRF_PASSWORD", "upstream-secret-for-ssrf-tests")
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(
            UpstreamConfig(
                "registry.example",
                str(server.make_url("")).rstrip("/"),
                username="robot",
                password_env="PULLGATE_TEST_SSRF_PASSWORD",
            ),
        ),
        default_upstream="registry.example",
        timeouts=TimeoutConfig(connect=1, read=2, manifest=2, retries=0, backoff=0.01),
    )
    return await aiohttp_client(create_app(config))


def errors(client: Client, kind: str) -> float:
    labels = {"upstream": "registry.example", "kind": kind}
    return client.app[METRICS].registry.get_sample_value("pullgate_upstream_errors_total", labels) or 0.0


# --- token realms ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "realm",
    [
        "http://{bait}/token",  # another loopback address
        "http://localhost:{port}/token",  # resolves to loopback, but is not the upstream's name
        "https://auth.docker.io/token",  # a well-known realm, but for Docker Hub only
        "http://169.254.169.254/latest/meta-data/iam",
        "file:///etc/passwd",
        "ftp://{bait}/token",
    ],
)
async def test_realm_on_a_disallowed_host_is_never_contacted(
    mirror: Client, hostile: tuple[Hostile, TestServer], bait: Callable[[str], Awaitable[Bait]], realm: str,
    outbound: Outbound,
) -> None:
    state, _ = hostile
    trap = await bait("127.0.0.2")
    state.realm = realm.format(bait=trap.netloc, port=trap.port)
    response = await mirror.get("/v2/app/manifests/1")
    assert response.status == 502
    assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert trap.connections == 0
    assert errors(mirror, "realm_refused") == 1
    assert {host for host, _ in outbound.attempts} == {"127.0.0.1"}, "only the upstream itself"


# --- redirects -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target",
    [
        "http://{bait2}/blob",  # plain http to another host
        "https://{bait2}/blob",  # loopback, not the upstream's own address
        "https://{bait3}/blob",
        "https://[::ffff:127.0.0.2]:{port2}/blob",  # the same, IPv4-mapped
        "https://2130706434:{port2}/blob",  # 127.0.0.2 as one decimal number
        "https://[::1]:{port6}/blob",
        "http://169.254.169.254/latest/meta-data/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/blob",
        "https://10.1.2.3/blob",  # private, and the upstream is not on a private network
        "https://192.168.0.1/blob",
        "https://0.0.0.0:{port2}/blob",
        "https://224.0.0.1/blob",
        "https://nowhere.example/blob",  # a name that does not resolve
        "https://bait.example:{port2}/blob",  # names resolving to forbidden addresses
        "https://metadata.example/latest/meta-data/",
        "https://intranet.example/blob",
        "https://rebind.example:{port2}/blob",
        "ftp://{bait2}/blob",
        "//169.254.169.254/blob",  # scheme-relative: http, another host
    ],
)
async def test_blob_redirect_to_a_forbidden_address_is_never_followed(
    mirror: Client,
    hostile: tuple[Hostile, TestServer],
    bait: Callable[[str], Awaitable[Bait]],
    target: str,
    outbound: Outbound,
) -> None:
    state, _ = hostile
    traps = [await bait("127.0.0.2"), await bait("127.0.0.3"), await bait("::1")]
    state.redirect = target.format(
        bait2=traps[0].netloc, port2=traps[0].port, bait3=traps[1].netloc, port6=traps[2].port
    )
    response = await mirror.get(f"/v2/app/blobs/{BLOB_DIGEST}")
    assert response.status == 502
    assert [t.connections for t in traps] == [0, 0, 0]
    assert errors(mirror, "redirect_refused") == 1
    assert {host for host, _ in outbound.attempts} == {"127.0.0.1"}


async def test_redirect_to_the_upstreams_own_host_works_without_credentials(
    mirror: Client, hostile: tuple[Hostile, TestServer]
) -> None:
    state, server = hostile
    state.redirect = str(server.make_url("/cdn/blob"))
    response = await mirror.get(f"/v2/app/blobs/{BLOB_DIGEST}")
    assert response.status == 200 and await response.read() == BLOB
    assert state.seen[-1] == ("/cdn/blob", None), "no Authorization on a redirect"


async def test_redirect_is_pinned_to_the_checked_address(
    hostile: tuple[Hostile, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the connection goes to the address that was checked; the name only
    travels as Host and TLS server name."""
    _, server = hostile
    monkeypatch.setitem(FAKE_DNS, "cdn.example", ["93.184.216.34"])
    timeouts = TimeoutConfig(connect=1, read=1, manifest=1)
    async with aiohttp.ClientSession() as session:
        config = UpstreamConfig("up", str(server.make_url("")).rstrip("/"))
        client = RegistryClient(config, session, timeouts, Metrics(CollectorRegistry()))
        url, server_name = await client._check_redirect(URL("https://cdn.example:8443/blob?X-Sig=1"))
        assert (str(url), server_name) == ("https://93.184.216.34:8443/blob?X-Sig=1", "cdn.example")
        with pytest.raises(UpstreamError, match="disallowed location"):
            await client._check_redirect(URL("https://rebind.example/blob"))


@pytest.mark.parametrize(
    ("target", "upstream", "allowed"),
    [
        ("93.184.216.34", {"127.0.0.1"}, True),
        ("2606:4700::1", {"127.0.0.1"}, True),
        ("127.0.0.1", {"127.0.0.1"}, True),  # the upstream's own address
        ("127.0.0.2", {"127.0.0.1"}, False),
        ("::1", {"127.0.0.1"}, False),
        ("::ffff:127.0.0.1", {"93.184.216.34"}, False),
        ("169.254.169.254", {"93.184.216.34"}, False),
        ("169.254.169.254", {"10.0.0.5"}, False),  # a private upstream still may not reach metadata
        ("fd00::1", {"93.184.216.34"}, False),
        ("10.0.0.6", {"93.184.216.34"}, False),
        ("10.0.0.6", {"10.0.0.5"}, True),  # private registry, storage next to it
        ("100.64.0.1", {"93.184.216.34"}, False),  # carrier-grade NAT is not public
        ("0.0.0.0", {"0.0.0.0"}, True),  # only as the upstream's own (odd) address
        ("0.0.0.0", {"127.0.0.1"}, False),
        ("239.1.1.1", {"10.0.0.5"}, False),
    ],
)
def test_address_policy(target: str, upstream: set[str], allowed: bool) -> None:
    own = frozenset(ipaddress.ip_address(a) for a in upstream)
    assert netguard.allowed(ipaddress.ip_address(target), own) is allowed


# --- client-supplied hosts -------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/v2/app/manifests/1?ns=evil.example",
        "/v2/app/manifests/1?ns={bait}",
        "/v2/app/manifests/1?ns=169.254.169.254",
        "/v2/app/manifests/1?ns=localhost",
        "/v2/evil.example/app/manifests/1",
        "/v2/{bait}/app/manifests/1",
        "/v2/169.254.169.254/latest/manifests/1",
        "/v2/app/blobs/" + "sha256:" + "0" * 64 + "?ns={bait}",
        "/v2/app/tags/list?ns={bait}",
        "/v2/app/referrers/sha256:" + "1" * 64 + "?ns={bait}",
    ],
)
async def test_client_supplied_hosts_are_never_contacted(
    mirror: Client, bait: Callable[[str], Awaitable[Bait]], path: str, outbound: Outbound
) -> None:
    trap = await bait("127.0.0.2")
    response = await mirror.get(path.format(bait=trap.netloc))
    # 404 for an unknown ns; a host-shaped first path segment that names no upstream is
    # part of a repository name of the default upstream (asked there: its garbage answer
    # is a 502) or not a valid name at all (400).
    assert response.status in (400, 404, 502)
    assert trap.connections == 0
    assert {host for host, _ in outbound.attempts} <= {"127.0.0.1"}
