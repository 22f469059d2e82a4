"""Client certificates on the admission webhook's listener (``admission.client_ca``; issue 13
finding 10): ``/mutate`` resolves tags of private upstreams with the mirror's credentials,
and answered a pinned digest of a private repository to anyone who reached the port.

Real TLS handshakes throughout: the listener with a server certificate from one CA and a
client CA from another; callers without a certificate, with one from another CA, expired,
issued for servers only, or self-signed are turned away — the TLS layer refuses a bad
certificate, the listener answers 403 to none at all (the kubelet's probes carry none and
stay open). The attack itself runs against the daemon's app with a private upstream (real
Distribution behind the real token issuer): the unauthenticated review resolves nothing.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config.settings import AdmissionConfig, CacheConfig, Config, TimeoutConfig, UpstreamConfig, load_config
from proxy.errors import ConfigError
from proxy.http.app import create_app
from proxy.http.tls import ReloadingTLS
from proxy.http.webhook_listener import WebhookServer, run_webhook
from proxy.ops.metrics import Metrics
from tests.support.aio import ServerFactory
from tests.support.certs import CertificateAuthority, make_ca, write_cert
from tests.support.images import ImageFactory
from tests.support.procs import free_port
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

DATA = Path(__file__).parent / "data" / "admission"
REFUSED = "refused"  # the TLS handshake fails: no HTTP request reaches the app


@dataclass(frozen=True)
class Pki:
    server_ca: CertificateAuthority
    server: tuple[Path, Path]
    apiserver_ca: CertificateAuthority
    callers: dict[str, tuple[Path, Path] | None]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca = make_ca(tmp_path / "pki", "webhook-ca")
    server = server_ca.issue(tmp_path / "pki", "webhook", usage="server", dns=("localhost",))
    apiserver_ca = make_ca(tmp_path / "pki", "apiserver-client-ca")
    other_ca = make_ca(tmp_path / "pki", "some-other-ca")
    callers: dict[str, tuple[Path, Path] | None] = {
        "none": None,
        "apiserver": apiserver_ca.issue(tmp_path / "pki" / "ok", "kube-apiserver"),
        "other-ca": other_ca.issue(tmp_path / "pki" / "other", "kube-apiserver"),
        "expired": apiserver_ca.issue(tmp_path / "pki" / "expired", "kube-apiserver", expired=True),
        "server-only": apiserver_ca.issue(tmp_path / "pki" / "server-only", "kube-apiserver", usage="server"),
        "self-signed": write_cert(_mkdir(tmp_path / "pki" / "self"), serial=7),
    }
    return Pki(server_ca, server, apiserver_ca, callers)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def client_context(pki: Pki, caller: str) -> ssl.SSLContext:
    """What the API server does: verify the webhook's certificate, present its own."""
    context = ssl.create_default_context(cafile=pki.server_ca.pem)
    identity = pki.callers[caller]
    if identity is not None:
        context.load_cert_chain(*identity)
    return context


async def call(url: str, context: ssl.SSLContext, body: dict[str, Any] | None = None) -> tuple[int, Any] | str:
    """(status, JSON) of a request, or ``REFUSED`` when TLS turned the connection away."""
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            method = "POST" if body is not None else "GET"
            async with session.request(method, url, json=body, server_hostname="localhost") as response:
                return response.status, await response.json(content_type=None)
        except aiohttp.ClientError:
            return REFUSED


# --- the listener, with a stand-in app that counts what reaches it ---------------------------
@dataclass
class Listener:
    server: WebhookServer
    reached: list[str]

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.server.port}{path}"


@pytest.fixture
async def listener(pki: Pki, tmp_path: Path) -> AsyncIterator[Listener]:
    reached: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({"path": request.path})

    app = web.Application()
    for path in ("/mutate", "/validate"):
        app.router.add_post(path, handle)
    for path in ("/healthz", "/readyz"):
        app.router.add_get(path, handle)
    admission = AdmissionConfig(
        enabled=True,
        listen=("127.0.0.1", 0),
        tls_cert=pki.server[0],
        tls_key=pki.server[1],
        client_ca=pki.apiserver_ca.pem,
    )
    config = Config(cache=CacheConfig(dir=tmp_path / "cache"), admission=admission)
    async with run_webhook(app, config, structlog.get_logger(), Metrics(CollectorRegistry())) as server:
        yield Listener(server, reached)


@pytest.mark.parametrize(
    ("caller", "review", "probe"),
    [
        ("apiserver", (200, ["/mutate", "/validate"]), 200),
        ("none", (403, []), 200),  # no certificate: the probes only
        ("other-ca", (REFUSED, []), REFUSED),
        ("expired", (REFUSED, []), REFUSED),
        ("server-only", (REFUSED, []), REFUSED),  # issued by the right CA, but not for clients
        ("self-signed", (REFUSED, []), REFUSED),
    ],
)
async def test_who_may_call_the_webhook(
    listener: Listener, pki: Pki, caller: str, review: tuple[int | str, list[str]], probe: int | str
) -> None:
    status, reached = review
    context = client_context(pki, caller)
    for path in ("/mutate", "/validate"):
        answer = await call(listener.url(path), context, {"kind": "AdmissionReview"})
        assert (answer if answer == REFUSED else answer[0]) == status, path
    assert listener.reached == reached, "nothing reaches the app without a verified certificate"
    for path in ("/healthz", "/readyz"):
        answer = await call(listener.url(path), context)
        assert (answer if answer == REFUSED else answer[0]) == probe, path


@pytest.mark.parametrize(
    "path",
    [
        "/healthz/../mutate",
        "/readyz/%2e%2e/mutate",
        "//mutate",
        "/mutate/",
        "/MUTATE",
        "/mutate?x=/healthz",
        "/%6dutate",
    ],
)
async def test_probe_paths_open_no_way_to_the_reviews(listener: Listener, pki: Pki, path: str) -> None:
    """Without a certificate, no spelling of a path reaches a review handler."""
    answer = await call(listener.url(path), client_context(pki, "none"), {"kind": "AdmissionReview"})
    assert answer != REFUSED and answer[0] in (403, 404, 405), answer
    assert listener.reached == []


async def test_a_refused_caller_is_logged_without_its_request(listener: Listener, pki: Pki) -> None:
    with structlog.testing.capture_logs() as logs:
        answer = await call(listener.url("/mutate"), client_context(pki, "none"), {"secret": "x"})
    assert answer == (403, {"error": "a client certificate signed by admission.client_ca is required"})
    (event,) = [e for e in logs if e["event"] == "admission_client_refused"]
    assert event["path"] == "/mutate" and event["remote"] == "127.0.0.1" and "secret" not in repr(event)


async def test_client_ca_is_reloaded_with_the_certificate(listener: Listener, pki: Pki, tmp_path: Path) -> None:
    """cert-manager rotates the client CA: after the reload the new CA's certificates are
    admitted and the old CA's are not — on the listening socket, without a restart."""
    assert listener.server.tls is not None
    old = client_context(pki, "apiserver")
    rotated = make_ca(tmp_path / "rotated", "apiserver-client-ca-2")
    new_identity = rotated.issue(tmp_path / "rotated", "kube-apiserver")
    new = ssl.create_default_context(cafile=pki.server_ca.pem)
    new.load_cert_chain(*new_identity)
    assert await call(listener.url("/mutate"), old, {}) != REFUSED
    assert await call(listener.url("/mutate"), new, {}) == REFUSED
    os.replace(rotated.pem, pki.apiserver_ca.pem)
    assert await listener.server.tls.reload()
    assert await call(listener.url("/mutate"), new, {}) == (200, {"path": "/mutate"})
    assert await call(listener.url("/mutate"), old, {}) == REFUSED


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("admission: {client_ca: /ca.pem}", "admission.client_ca: client certificates need TLS"),
        ("admission: {client_ca: 7}", "admission.client_ca: expected a path"),
    ],
)
def test_client_ca_config_errors_name_the_key(tmp_path: Path, yaml_text: str, error: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=error):
        load_config(path, {})


@pytest.mark.parametrize("content", [b"", b"not a certificate", None])
def test_unloadable_client_ca_is_a_startup_error(tmp_path: Path, content: bytes | None) -> None:
    cert, key = write_cert(tmp_path, serial=1)
    ca = tmp_path / "client-ca.pem"
    if content is not None:
        ca.write_bytes(content)
    with pytest.raises(ConfigError, match=r"admission\.client_ca: cannot load"):
        ReloadingTLS(cert, key, structlog.get_logger(), Metrics(CollectorRegistry()), client_ca=ca)


# --- the attack: a private tag resolved for an anonymous caller ------------------------------
POLICY = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: pin}}
spec:
  mode: enforce
  match: {{images: ["ghcr.io/{repo}"]}}
  rules: {{resolveTags: true}}
"""


def review(image: str) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(json.loads((DATA / "pod-create.json").read_text()))
    spec = doc["request"]["object"]["spec"]
    spec["containers"] = [{**spec["containers"][0], "name": "app", "image": image}]
    for key in ("initContainers", "ephemeralContainers", "volumes"):
        spec.pop(key, None)
    return doc


async def test_private_tags_are_resolved_only_for_the_api_server(
    pki: Pki,
    auth_registry: Registry,
    token_server: TokenServer,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, password = token_server.creds
    monkeypatch.setenv("PULLGATE_TEST_WEBHOOK_UPSTREAM", password)
    image = image_factory.image("1.0", layers=[2_000])
    await auth_registry.apush(image.layout, "1.0", f"{repo}:1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "pin.yaml").write_text(POLICY.format(repo=repo))
    port = free_port()
    private = UpstreamConfig(
        "ghcr.io", auth_registry.url, user, "PULLGATE_TEST_WEBHOOK_UPSTREAM", auth_hosts=(token_server.url,)
    )
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(private,),
        timeouts=TimeoutConfig(connect=2, read=10, manifest=10, retries=0, backoff=0.01),
        admission=AdmissionConfig(
            enabled=True,
            listen=("127.0.0.1", port),
            tls_cert=pki.server[0],
            tls_key=pki.server[1],
            client_ca=pki.apiserver_ca.pem,
        ),
        policies=policies,
    )
    await aiohttp_server(create_app(config))
    url = f"https://127.0.0.1:{port}/mutate"
    body = review(f"ghcr.io/{repo}:1.0")
    since = await auth_registry.amark()
    for caller in ("none", "other-ca", "self-signed"):
        answer = await call(url, client_context(pki, caller), body)
        assert answer == REFUSED or answer[0] == 403, caller
    assert await auth_registry.acount_requests(None, r"^/v2/", since=since) == 0, "nothing was resolved upstream"
    answer = await call(url, client_context(pki, "apiserver"), body)
    assert isinstance(answer, tuple) and answer[0] == 200
    (op,) = json.loads(base64.b64decode(answer[1]["response"]["patch"]))
    assert op["value"] == f"ghcr.io/{repo}:1.0@{image.manifest_digest}"
