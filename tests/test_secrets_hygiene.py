"""Secrets hygiene: upstream passwords and tokens, client passwords (right and wrong),
static and issued bearer tokens, the token signing key and presigned redirect URLs never
appear in logs, metrics, error bodies or config dumps.

Representative flows run with every kind of secret configured, in process (every log
event rendered as the daemon renders it) and as the real daemon against the real token-auth
registry (its log file). The conftest log scan checks every other test's output as well."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from proxy.access.passwords import hash_scrypt, token_digest
from proxy.config.settings import (
    AccessConfig,
    AccessRule,
    CacheConfig,
    Config,
    TimeoutConfig,
    UpstreamConfig,
    load_config,
)
from proxy.http.app import create_app
from tests.support.aio import ClientFactory, ServerFactory
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

UPSTREAM_PASSWORD = "upstream-pa55word-7c1d"
UPSTREAM_TOKEN = "upstream-bearer-token-93ab"
ALICE_PASSWORD = "alice-pa55phrase-4e2a"
WRONG_GUESS = "wrong-guess-pa55-81f0"
CI_TOKEN = "ci-static-token-0f9b2d6c5e4a"
TOKEN_KEY = "token-signing-key-" + "9" * 32
PRESIGNED = "X-Amz-Signature=presigned-sig-5d3c"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class PrivateRegistry:
    """An upstream demanding Bearer tokens from its own realm, for Basic credentials."""

    def __init__(self) -> None:
        self.realm = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_route("*", "/v2/{tail:.*}", self.registry)
        return app

    async def token(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != basic("robot", UPSTREAM_PASSWORD)["Authorization"]:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        return web.json_response({"token": UPSTREAM_TOKEN, "expires_in": 300})

    async def registry(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_TOKEN}":
            challenge = f'Bearer realm="{self.realm}",service="private"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        if "/blobs/" in request.path:
            return web.Response(status=307, headers={"Location": f"https://169.254.169.254/blob?{PRESIGNED}"})
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)


def secrets_of(*extra: str) -> list[str]:
    return [UPSTREAM_PASSWORD, UPSTREAM_TOKEN, ALICE_PASSWORD, WRONG_GUESS, CI_TOKEN, TOKEN_KEY, PRESIGNED, *extra]


def mirror_config(tmp_path: Path, upstream_url: str, password_env: str, key_env: str) -> Config:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{hash_scrypt(ALICE_PASSWORD, ln=4)}\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci:sha256:{token_digest(CI_TOKEN)}\n")
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", upstream_url, username="robot", password_env=password_env),),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=1, read=2, manifest=2, retries=0, backoff=0.01),
        access=AccessConfig(
            enabled=True,
            htpasswd=htpasswd,
            tokens=tokens,
            token_secret_env=key_env,
            failed_login_limit=3,
            rules=(AccessRule(("docker.io/library/**",), anonymous=True), AccessRule(("docker.io/**",), users=("*",))),
        ),
    )


async def test_no_secret_in_logs_metrics_errors_or_dumps(
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    secret: Callable[[str], str],
) -> None:
    for value in secrets_of():
        secret(value)
    private = PrivateRegistry()
    upstream = await aiohttp_server(private.app())
    private.realm = str(upstream.make_url("/token"))
    monkeypatch.setenv("PULLGATE_TEST_UPSTREAM_PASSWORD", UPSTREAM_PASSWORD)
    monkeypatch.setenv("PULLGATE_TEST_TOKEN_KEY", TOKEN_KEY)
    config = mirror_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), "PULLGATE_TEST_UPSTREAM_PASSWORD", "PULLGATE_TEST_TOKEN_KEY"
    )
    client = await aiohttp_client(create_app(config))
    seen: list[str] = []  # everything a client or an operator gets to see
    issued: list[str] = []

    async def call(path: str, headers: dict[str, str] | None = None, *, token_body: bool = False) -> int:
        response = await client.get(path, headers=headers or {})
        body = await response.text()
        if token_body:
            issued.append(json.loads(body)["token"])  # the one place a token is meant to be
        else:
            seen.append(body)
        seen.append(json.dumps(dict(response.headers)))
        return response.status

    blob = "sha256:" + "a" * 64
    with structlog.testing.capture_logs() as logs:
        assert await call("/v2/acme/app/manifests/1", basic("alice", ALICE_PASSWORD)) == 404  # token flow upstream
        assert await call(f"/v2/acme/app/blobs/{blob}", basic("alice", ALICE_PASSWORD)) == 502  # presigned redirect
        assert await call("/v2/acme/app/manifests/1", {"Authorization": f"Bearer {CI_TOKEN}"}) == 404
        assert await call("/auth/token", basic("alice", ALICE_PASSWORD), token_body=True) == 200
        assert await call("/v2/acme/app/manifests/2", {"Authorization": f"Bearer {issued[0]}"}) == 404
        assert await call("/v2/acme/app/manifests/1", basic("alice", WRONG_GUESS)) == 401
        assert await call("/v2/acme/app/manifests/1", basic(ALICE_PASSWORD, "x")) == 401  # password typed as name
        assert await call("/v2/acme/app/manifests/1", {"Authorization": f"Bearer {CI_TOKEN}x"}) == 401
        assert await call("/v2/acme/app/manifests/1", basic("alice", ALICE_PASSWORD)) == 429  # rate limited
        monkeypatch.setenv("PULLGATE_TEST_UPSTREAM_PASSWORD", WRONG_GUESS)  # the upstream refuses us now
        assert await call("/v2/library/other/manifests/1") == 502
        assert await call("/metrics") == 200
    rendered = [json.dumps(event, default=str) for event in logs]
    for event in ("auth_failed", "auth_rate_limited", "upstream_redirect_refused", "http_request"):
        assert any(f'"event": "{event}"' in line for line in rendered), event
    dump = json.dumps(config.redacted(), default=str)
    assert "PULLGATE_TEST_UPSTREAM_PASSWORD" in dump and "PULLGATE_TEST_TOKEN_KEY" in dump  # names, not values
    haystack = "\n".join([*rendered, *seen, dump, repr(config)])
    leaked = [s for s in secrets_of(*issued) if s in haystack]
    assert leaked == []


def test_daemon_log_and_metrics_hold_no_secret(
    auth_registry: Registry,
    token_server: TokenServer,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    secret: Callable[[str], str],
) -> None:
    """The real daemon, its JSON log file, against the real token-auth registry."""
    user, password = token_server.creds
    for value in secrets_of(password):
        secret(value)
    image = image_factory.image("1", layers=[10_000])
    auth_registry.push(image.layout, "1", f"{repo}:1")
    # Not PULLGATE_*: the daemon would take those for config overrides.
    monkeypatch.setenv("HYGIENE_UPSTREAM_PASSWORD", password)
    monkeypatch.setenv("HYGIENE_TOKEN_KEY", TOKEN_KEY)
    config = mirror_config(tmp_path, auth_registry.url, "HYGIENE_UPSTREAM_PASSWORD", "HYGIENE_TOKEN_KEY")
    settings: dict[str, Any] = json.loads(json.dumps(config.redacted(), default=str))
    settings["upstreams"][0]["username"] = user
    settings["upstreams"][0]["auth_hosts"] = [token_server.url]  # the issuer's origin (another port)
    for key in ("listen", "tls_cert", "tls_key", "policies", "admission"):
        settings.pop(key)
    with Daemon(tmp_path / "daemon", auth_registry.url, **settings) as daemon:
        assert load_config(daemon.config, {}).access.enabled
        alice = basic("alice", ALICE_PASSWORD)
        statuses = [
            http_get(f"{daemon.url('')}/v2/{repo}/manifests/1", alice),
            http_get(f"{daemon.url('')}/v2/{repo}/manifests/1", {"Authorization": f"Bearer {CI_TOKEN}"}),
            http_get(f"{daemon.url('')}/v2/{repo}/manifests/1", basic("alice", WRONG_GUESS)),
            http_get(f"{daemon.url('')}/v2/{repo}/manifests/1", basic(ALICE_PASSWORD, WRONG_GUESS)),
        ]
        assert statuses == [200, 200, 401, 401]
        metrics = urllib.request.urlopen(f"{daemon.url('')}/metrics", timeout=10).read().decode()
        daemon.stop()
        log = daemon.events_text()
        names = {event.get("event") for event in daemon.events()}
    assert {"auth_failed", "http_request"} <= names
    leaked = [s for s in secrets_of(password) if s in log + metrics]
    assert leaked == []


def http_get(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=20) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
