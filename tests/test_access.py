"""Client authentication and pull rules (``proxy.access.control``, ``proxy.access.passwords``): hash
formats, rules, config errors, and the access matrix over HTTP against the fault-knob
origin — including a digest held by a public and a private repository at once.

(The same matrix with skopeo and containerd against real registries is in
``test_access_e2e.py``.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
import structlog
from aiohttp.test_utils import TestServer

from proxy.access.control import ANONYMOUS, Identity, Rules
from proxy.access.passwords import (
    HashFormatError,
    PasswordHash,
    hash_scrypt,
    parse_htpasswd,
    parse_tokens,
    token_digest,
)
from proxy.config.settings import (
    AccessConfig,
    AccessRule,
    CacheConfig,
    Config,
    TimeoutConfig,
    UpstreamConfig,
    load_config,
)
from proxy.errors import ConfigError
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS
from tests.support.aio import Client, ClientFactory
from tests.support.images import sha256_digest
from tests.support.origin import OCI_MANIFEST, Origin, StartMirror
from tests.support.polling import eventually

# Written by Apache's `htpasswd -nbB -C 5 alice 'correct horse battery'` (apache2-utils 2.4).
APACHE_BCRYPT = "$2y$05$yUu3giJw8xQTj8/1Y5xUfO0MfqeaBHkJgXz49OR8laMd.qY9O4RSK"
ALICE_PASSWORD = "correct horse battery"
BOB_PASSWORD = "bob-secret-passphrase"
CAROL_PASSWORD = "carol-secret-passphrase"
CI_TOKEN = "ci-token-5f1e0c9a7b3d4e2f8a6c1b0d9e7f3a2c"


@pytest.fixture(autouse=True)
def _scan_logs_for_credentials(secret: Callable[[str], str]) -> None:
    """The conftest log scan fails any test whose output shows one of these."""
    for value in (ALICE_PASSWORD, BOB_PASSWORD, CAROL_PASSWORD, CI_TOKEN):
        secret(value)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- hashes ------------------------------------------------------------------------------
FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.mark.parametrize(
    ("make_hash", "password", "ok"),
    [
        (lambda: APACHE_BCRYPT, ALICE_PASSWORD, True),
        (lambda: APACHE_BCRYPT, "correct horse", False),
        (lambda: bcrypt.hashpw(b"pw-b", bcrypt.gensalt(4)).decode(), "pw-b", True),
        (lambda: bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode(), "x" * 73, False),  # no 72-byte truncation
        (lambda: FAST_ARGON2.hash("pw-argon"), "pw-argon", True),
        (lambda: FAST_ARGON2.hash("pw-argon"), "pw-argon2", False),
        (lambda: hash_scrypt("pw-scrypt", ln=4), "pw-scrypt", True),
        (lambda: hash_scrypt("pw-scrypt", ln=4), "pw-scryp", False),
        # passlib writes salt and hash in its "adapted base64" ('.' for '+').
        (lambda: hash_scrypt("pw", ln=4, salt=bytes([0xFB] * 16)).replace("+", "."), "pw", True),
    ],
)
def test_password_hashes(make_hash: Callable[[], str], password: str, ok: bool) -> None:
    assert PasswordHash.parse(make_hash()).verify(password) is ok


@pytest.mark.parametrize(
    ("encoded", "error"),
    [
        ("hunter2hunter2", "unsupported hash"),
        ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "unsupported hash"),
        ("$apr1$abcdefgh$0123456789012345678901", "unsupported hash"),
        ("$2y$05$short", "malformed bcrypt"),
        ("$argon2id$v=19$m=1024,t=1,p=1$bad", "malformed argon2"),
        ("$scrypt$ln=40,r=8,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA", "out of range"),
        ("$scrypt$ln=4,r=8,p=1$c2FsdA$aGFzaA", "too short"),
        ("$scrypt$ln=4$x$y", "malformed"),
    ],
)
def test_rejected_hashes(encoded: str, error: str) -> None:
    with pytest.raises(HashFormatError, match=error.replace("$", r"\$")):
        PasswordHash.parse(encoded)


def test_file_errors_name_the_line_never_its_content() -> None:
    with pytest.raises(HashFormatError) as info:
        parse_htpasswd(f"# users\nalice:{APACHE_BCRYPT}\nbob:hunter2hunter2\n", "users.htpasswd")
    assert str(info.value).startswith("users.htpasswd: line 3: unsupported hash")
    assert "hunter2" not in str(info.value)
    with pytest.raises(HashFormatError, match="line 1: expected sha256"):
        parse_tokens(f"ci:{CI_TOKEN}\n", "tokens")
    assert "5f1e0c9a" not in str(info.value)
    assert parse_tokens(f"ci:sha256:{token_digest(CI_TOKEN)}\n", "tokens") == {token_digest(CI_TOKEN): "ci"}


# --- rules -------------------------------------------------------------------------------
RULES = AccessConfig(
    enabled=True,
    htpasswd=Path("/unused"),
    groups={"ops": ("bob",)},
    rules=(
        AccessRule(repositories=("docker.io/library/**",), anonymous=True),
        AccessRule(repositories=("docker.io/acme/**",), users=("alice", "ci")),
        AccessRule(repositories=("quay.io/**",), groups=("ops",)),
        AccessRule(repositories=("quay.io/shared/*",), users=("*",)),
    ),
)
ALICE, BOB, CI = Identity("alice"), Identity("bob", frozenset({"ops"})), Identity("ci", method="token")


@pytest.mark.parametrize(
    ("identity", "upstream", "repository", "allowed"),
    [
        (ANONYMOUS, "docker.io", "library/nginx", True),
        (ANONYMOUS, "docker.io", "library/team/app", True),
        (ANONYMOUS, "docker.io", "acme/private", False),
        (ANONYMOUS, "quay.io", "shared/x", False),
        (ALICE, "docker.io", "acme/private", True),
        (ALICE, "docker.io", "acme/team/private", True),
        (ALICE, "docker.io", "acmeco/private", False),  # globs match whole segments
        (ALICE, "quay.io", "ops/tool", False),
        (ALICE, "quay.io", "shared/x", True),  # users: ["*"] = any authenticated identity
        (ALICE, "quay.io", "shared/x/y", False),
        (BOB, "quay.io", "ops/tool", True),
        (BOB, "docker.io", "acme/private", False),
        (BOB, "docker.io", "library/nginx", True),
        (CI, "docker.io", "acme/private", True),
    ],
)
def test_rules(identity: Identity, upstream: str, repository: str, allowed: bool) -> None:
    rules = Rules(RULES)
    identity = Identity(identity.name, rules.groups_of(identity.name) if identity.name else frozenset())
    assert rules.allows(identity, upstream, repository) is allowed


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("access: {enabled: true}", "access.rules: access is enabled but no rule"),
        ("access: {enabled: true, rules: [{repositories: ['docker.io/**']}]}", r"access.rules\[0\]: grants nobody"),
        ("access: {enabled: true, rules: [{repositories: [], anonymous: true}]}", r"rules\[0\].repositories: at least"),
        ("access: {enabled: true, rules: [{repositories: ['gcr.io/**'], anonymous: true}]}", "configured upstream"),
        ("access: {enabled: true, rules: [{repositories: ['docker.io/**'], users: [a]}]}", "no access.htpasswd"),
        (
            "access: {enabled: true, htpasswd: /x, rules: [{repositories: ['docker.io/**'], groups: [g]}]}",
            "unknown group 'g'",
        ),
        ("access: {groups: {ops: bob}}", "access.groups: group 'ops'"),
        ("access: {enabled: true, realm: 'a\"b', rules: [{repositories: ['**'], anonymous: true}]}", "access.realm"),
        ("access: {rules: [{repositories: ['**'], anonymous: true, push: true}]}", r"rules\[0\].push: unknown key"),
        ("access: {failed_login_limit: many}", "access.failed_login_limit: expected a number"),
        ("limits: {upstream_fetches: 0}", "limits.upstream_fetches: must be at least 1"),
        ("limits: {send_timeout: 0s}", "limits.send_timeout: must be positive"),
        ("tls_cert: /a.pem", "tls_cert: tls_cert and tls_key go together"),
    ],
)
def test_bad_access_config_names_the_key(tmp_path: Path, yaml_text: str, error: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=error):
        load_config(path, {})


def test_access_config_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "access:\n  enabled: true\n  htpasswd: /etc/pullgate/htpasswd\n  groups: {ops: [bob]}\n"
        "  rules:\n    - {repositories: ['docker.io/library/**'], anonymous: true}\n"
        "    - {repositories: ['docker.io/acme/**'], groups: [ops]}\n"
    )
    config = load_config(path, {"PULLGATE_ACCESS__GROUPS__DEV": "[carol]", "PULLGATE_ACCESS__FAILED_LOGIN_LIMIT": "3"})
    assert dict(config.access.groups) == {"ops": ("bob",), "dev": ("carol",)}
    assert config.access.failed_login_limit == 3
    assert config.access.rules[1] == AccessRule(repositories=("docker.io/acme/**",), groups=("ops",))
    assert config.redacted()["access"]["groups"] == {"ops": ["bob"], "dev": ["carol"]}


def test_bad_credential_file_is_a_startup_error(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:plain-text-password\n")
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        access=AccessConfig(enabled=True, htpasswd=htpasswd, rules=(AccessRule(("docker.io/**",), users=("alice",)),)),
    )
    with pytest.raises(ConfigError, match=r"access\.htpasswd: .*line 1: unsupported hash") as info:
        create_app(config)
    assert "plain-text-password" not in info.value.message


# --- over HTTP ---------------------------------------------------------------------------
@pytest.fixture
def credentials(tmp_path: Path) -> tuple[Path, Path]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        f"alice:{APACHE_BCRYPT}\n"
        f"bob:{FAST_ARGON2.hash(BOB_PASSWORD)}\n"
        f"carol:{hash_scrypt(CAROL_PASSWORD, ln=4)}\n"
    )
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# name:sha256:<hex>\nci:sha256:{token_digest(CI_TOKEN)}\n")
    return htpasswd, tokens


def access_config(tmp_path: Path, origin_url: str, htpasswd: Path, tokens: Path, **access: Any) -> Config:
    settings: dict[str, Any] = {
        "enabled": True,
        "htpasswd": htpasswd,
        "tokens": tokens,
        "groups": {"ops": ("bob",)},
        "rules": (
            AccessRule(repositories=("docker.io/library/**",), anonymous=True),
            AccessRule(repositories=("docker.io/acme/**",), users=("alice", "ci")),
            AccessRule(repositories=("quay.io/**",), groups=("ops",)),
        ),
    } | access
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", origin_url), UpstreamConfig("quay.io", origin_url)),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=2, read=5, manifest=5, retries=0, backoff=0.01),
        access=AccessConfig(**settings),
    )


Mirror = tuple[Client, Origin]




@pytest.fixture
def make_mirror(
    start_mirror: StartMirror, origin_url: str, tmp_path: Path, credentials: tuple[Path, Path]
) -> Callable[..., Awaitable[Mirror]]:
    async def make(**access: Any) -> Mirror:
        return await start_mirror(access_config(tmp_path, origin_url, *credentials, **access))

    return make


@pytest.fixture
async def mirror(make_mirror: Callable[..., Awaitable[Mirror]]) -> Mirror:
    return await make_mirror()


def metric(client: Client, name: str, labels: dict[str, str] | None = None) -> float:
    return client.app[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


async def error_code(response: Any) -> str:
    return str((await response.json())["errors"][0]["code"])


ANON: dict[str, str] = {}


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v2/library/app/manifests/1", ANON, 200, None),
        ("/v2/app/manifests/1", ANON, 200, None),  # Docker Hub shorthand: library/app
        ("/v2/acme/private/manifests/1", ANON, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1?ns=docker.io", ANON, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1?ns=index.docker.io", ANON, 401, "UNAUTHORIZED"),
        ("/v2/docker.io/acme/private/manifests/1", ANON, 401, "UNAUTHORIZED"),
        ("/v2/registry-1.docker.io/acme/private/manifests/1", ANON, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/tags/list", ANON, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/referrers/sha256:" + "1" * 64, ANON, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1", basic("alice", ALICE_PASSWORD), 200, None),
        ("/v2/acme/private/manifests/1", basic("alice", "wrong"), 401, "UNAUTHORIZED"),
        ("/v2/library/app/manifests/1", basic("alice", "wrong"), 401, "UNAUTHORIZED"),  # never falls back
        ("/v2/acme/private/manifests/1", basic("mallory", ALICE_PASSWORD), 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1", basic("bob", BOB_PASSWORD), 403, "DENIED"),
        ("/v2/quay.io/ops/tool/manifests/1", basic("bob", BOB_PASSWORD), 200, None),
        ("/v2/ops/tool/manifests/1?ns=quay.io", basic("bob", BOB_PASSWORD), 200, None),
        ("/v2/quay.io/ops/tool/manifests/1", basic("alice", ALICE_PASSWORD), 403, "DENIED"),
        ("/v2/quay.io/ops/tool/manifests/1", basic("carol", CAROL_PASSWORD), 403, "DENIED"),
        ("/v2/quay.io/ops/tool/manifests/1", ANON, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1", bearer(CI_TOKEN), 200, None),
        ("/v2/acme/private/manifests/1", basic("ci", CI_TOKEN), 200, None),  # token as a Basic password
        ("/v2/acme/private/manifests/1", basic("alice", CI_TOKEN), 401, "UNAUTHORIZED"),  # not alice's token
        ("/v2/acme/private/manifests/1", bearer(CI_TOKEN + "x"), 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1", {"Authorization": "Basic !!!"}, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1", {"Authorization": "Digest x"}, 401, "UNAUTHORIZED"),
        ("/v2/acme/private/manifests/1?ns=evil.example", basic("alice", ALICE_PASSWORD), 404, "NAME_UNKNOWN"),
        ("/v2/", ANON, 401, "UNAUTHORIZED"),  # the ping always challenges: see proxy.access.tokens
        ("/v2/", basic("alice", "wrong"), 401, "UNAUTHORIZED"),
        ("/v2/", basic("alice", ALICE_PASSWORD), 200, None),
        ("/v2/", basic("", ""), 200, None),  # containers/image's "no credentials" answer to a Basic challenge
        ("/v2/acme/private/manifests/1", basic("", ""), 401, "UNAUTHORIZED"),
    ],
)
async def test_access_matrix(mirror: Mirror, path: str, headers: dict[str, str], status: int, code: str | None) -> None:
    client, origin = mirror
    origin.add_image("library/app", "1")
    origin.add_image("acme/private", "1")
    origin.add_image("ops/tool", "1")
    response = await client.get(path, headers=headers)
    assert response.status == status
    if code is not None:
        assert await error_code(response) == code
    if status == 401:
        realm = f"http://127.0.0.1:{client.server.port}/auth/token"
        assert response.headers["WWW-Authenticate"].startswith(f'Bearer realm="{realm}",service="pullgate"')
    if status in (401, 403):
        assert sum(origin.requests.values()) == 0, "a refused request never reaches the upstream"


async def test_token_flow(mirror: Mirror) -> None:
    """What docker, skopeo and containerd do after the ping's Bearer challenge."""
    client, origin = mirror
    origin.add_image("library/app", "1")
    origin.add_image("acme/private", "1")
    ping = await client.get("/v2/")
    challenge = ping.headers["WWW-Authenticate"]
    assert challenge == f'Bearer realm="http://127.0.0.1:{client.server.port}/auth/token",service="pullgate"'
    scope = {"service": "pullgate", "scope": "repository:acme/private:pull"}
    anonymous = await client.get("/auth/token", params=scope)
    assert anonymous.status == 200 and anonymous.headers["Cache-Control"] == "no-store"
    body = await anonymous.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    anon = bearer(body["token"])
    assert (await client.get("/v2/", headers=anon)).status == 200
    assert (await client.get("/v2/library/app/manifests/1", headers=anon)).status == 200
    refused = await client.get("/v2/acme/private/manifests/1", headers=anon)
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"].endswith(',scope="repository:acme/private:pull"')
    wrong = await client.get("/auth/token", params=scope, headers=basic("alice", "wrong"))
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"] == 'Basic realm="pullgate", charset="UTF-8"'
    alice_response = await client.get("/auth/token", params=scope, headers=basic("alice", ALICE_PASSWORD))
    alice_token = (await alice_response.json())["token"]
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(alice_token))).status == 200
    bob_token = (await (await client.get("/auth/token", headers=basic("bob", BOB_PASSWORD))).json())["token"]
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(bob_token))).status == 403


@pytest.mark.parametrize(
    ("tamper", "status", "counted"),
    [
        (lambda t: t, 200, False),
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), 401, True),  # forged signature
        (lambda t: t.replace("pgt1.", "pgt1.e30"), 401, True),
        (lambda t: "pgt1.x", 401, True),
    ],
)
async def test_issued_tokens_cannot_be_forged(
    mirror: Mirror, tamper: Callable[[str], str], status: int, counted: bool
) -> None:
    client, origin = mirror
    origin.add_image("acme/private", "1")
    token = (await (await client.get("/auth/token", headers=basic("alice", ALICE_PASSWORD))).json())["token"]
    response = await client.get("/v2/acme/private/manifests/1", headers=bearer(tamper(token)))
    assert response.status == status
    assert metric(client, "pullgate_auth_failures_total", {"reason": "bad_token"}) == (1 if counted else 0)


async def test_expired_token_is_refused_without_counting_as_a_failed_login(
    make_mirror: Callable[..., Awaitable[Mirror]],
) -> None:
    client, origin = await make_mirror(token_ttl=1.0, failed_login_limit=1)
    origin.add_image("acme/private", "1")
    token = (await (await client.get("/auth/token", headers=basic("alice", ALICE_PASSWORD))).json())["token"]
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(token))).status == 200
    await asyncio.sleep(2.1)
    for _ in range(3):
        expired = await client.get("/v2/acme/private/manifests/1", headers=bearer(token))
        assert expired.status == 401 and "Bearer realm=" in expired.headers["WWW-Authenticate"]
    fresh = (await (await client.get("/auth/token", headers=basic("alice", ALICE_PASSWORD))).json())["token"]
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(fresh))).status == 200


async def test_token_signing_key_from_the_environment(
    make_mirror: Callable[..., Awaitable[Mirror]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Replicas sharing access.token_secret_env accept each other's tokens."""
    monkeypatch.setenv("PULLGATE_TEST_TOKEN_KEY", "k" * 40)
    first, origin = await make_mirror(token_secret_env="PULLGATE_TEST_TOKEN_KEY")
    origin.add_image("acme/private", "1")
    token = (await (await first.get("/auth/token", headers=basic("alice", ALICE_PASSWORD))).json())["token"]
    second, _ = await make_mirror(token_secret_env="PULLGATE_TEST_TOKEN_KEY")
    assert (await second.get("/v2/acme/private/manifests/1", headers=bearer(token))).status == 200
    monkeypatch.setenv("PULLGATE_TEST_TOKEN_KEY", "short")
    with pytest.raises(ConfigError, match=r"access\.token_secret_env: .* at least 32"):
        await make_mirror(token_secret_env="PULLGATE_TEST_TOKEN_KEY")


async def test_without_anonymous_rules(make_mirror: Callable[..., Awaitable[Mirror]]) -> None:
    client, origin = await make_mirror(rules=(AccessRule(repositories=("docker.io/**",), users=("alice",)),))
    origin.add_image("library/app", "1")
    assert (await client.get("/v2/")).status == 401
    assert (await client.get("/v2/app/manifests/1")).status == 401
    assert (await client.get("/v2/", headers=basic("alice", ALICE_PASSWORD))).status == 200
    assert (await client.get("/v2/app/manifests/1", headers=basic("alice", ALICE_PASSWORD))).status == 200


async def test_shared_digest_is_never_served_through_a_repository_the_client_may_not_pull(mirror: Mirror) -> None:
    """The same layer in a public and a private repository; the private image's config and
    manifest exist only there. Alice pulls the private image, so everything is cached."""
    client, origin = mirror
    private = origin.add_image("acme/private", "1", layers=[50_000, 3_000])
    shared_layer = private.layers[0]
    public_manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(b"{}"), "size": 2
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(shared_layer),
                 "size": len(shared_layer)}
            ],
        }
    ).encode()
    origin.put_manifest("library/public", "1", OCI_MANIFEST, public_manifest)
    origin.blobs[("library/public", sha256_digest(shared_layer))] = shared_layer
    origin.blobs[("library/public", sha256_digest(b"{}"))] = b"{}"
    alice = basic("alice", ALICE_PASSWORD)
    assert (await client.get("/v2/acme/private/manifests/1", headers=alice)).status == 200
    for blob in private.blobs:
        response = await client.get(f"/v2/acme/private/blobs/{blob}", headers=alice)
        assert response.status == 200 and await response.read() == private.blobs[blob]
    origin.requests.clear()
    private_only = sha256_digest(private.config)
    cases = [
        # (path, headers, status): anonymous, wrong password and the wrong user, every spelling
        (f"/v2/acme/private/blobs/{sha256_digest(shared_layer)}", ANON, 401),
        (f"/v2/acme/private/blobs/{private_only}", ANON, 401),
        (f"/v2/acme/private/blobs/{private_only}", basic("alice", "nope"), 401),
        (f"/v2/acme/private/blobs/{private_only}", basic("bob", BOB_PASSWORD), 403),
        (f"/v2/docker.io/acme/private/blobs/{private_only}", ANON, 401),
        (f"/v2/acme/private/blobs/{private_only}?ns=docker.io", ANON, 401),
        (f"/v2/acme/private/manifests/{private.digest}", ANON, 401),
        (f"/v2/library/public/blobs/{private_only}", ANON, 404),  # not in the public repository
        (f"/v2/library/public/manifests/{private.digest}", ANON, 404),
        (f"/v2/library/public/blobs/{sha256_digest(shared_layer)}", ANON, 200),  # it is public too
    ]
    for path, headers, status in cases:
        for method in ("GET", "HEAD"):
            response = await client.request(method, path, headers=headers)
            assert (path, method, response.status) == (path, method, status)
            if status == 200 and method == "GET":
                assert await response.read() == shared_layer
    # Only the public repository was asked about (to confirm it holds what it was asked for).
    assert {path for (_, path) in origin.requests} <= {
        f"/v2/library/public/blobs/{sha256_digest(shared_layer)}",
        f"/v2/library/public/blobs/{private_only}",
        f"/v2/library/public/manifests/{private.digest}",
    }


async def test_failed_logins_are_rate_limited_logged_and_counted(make_mirror: Callable[..., Awaitable[Mirror]]) -> None:
    client, origin = await make_mirror(failed_login_limit=3)
    origin.add_image("acme/private", "1")
    with structlog.testing.capture_logs() as logs:
        for attempt in range(3):
            response = await client.get("/v2/acme/private/manifests/1", headers=basic("alice", f"guess-{attempt}"))
            assert response.status == 401
        blocked = await client.get("/v2/acme/private/manifests/1", headers=basic("alice", ALICE_PASSWORD))
        assert blocked.status == 429 and await error_code(blocked) == "TOOMANYREQUESTS"
        assert 1 <= int(blocked.headers["Retry-After"]) <= 61
        # Anonymous requests carry nothing to guess with: still served where allowed.
        assert (await client.get("/v2/library/app/manifests/1")).status in (200, 404)
    failures = [e for e in logs if e["event"] == "auth_failed"]
    assert [(e["reason"], e["user"], e["scheme"]) for e in failures] == [("bad_password", "alice", "basic")] * 3
    assert all(e["remote"] == "127.0.0.1" for e in failures)
    assert [e["event"] for e in logs if e["event"] == "auth_rate_limited"] == ["auth_rate_limited"]
    assert "guess-" not in repr(logs) and ALICE_PASSWORD not in repr(logs)
    assert metric(client, "pullgate_auth_failures_total", {"reason": "bad_password"}) == 3
    assert metric(client, "pullgate_auth_failures_total", {"reason": "rate_limited"}) == 1


async def test_unknown_user_name_is_not_logged(mirror: Mirror) -> None:
    client, _ = mirror
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/v2/acme/private/manifests/1", headers=basic(ALICE_PASSWORD, "x"))
    assert response.status == 401
    assert [(e["reason"], e["user"]) for e in logs if e["event"] == "auth_failed"] == [("unknown_user", None)]
    assert ALICE_PASSWORD not in repr(logs)


async def test_verified_passwords_are_cached_and_shared(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, origin = mirror
    origin.add_image("acme/private", "1")
    calls: list[str] = []
    real_verify = PasswordHash.verify

    def counting(self: PasswordHash, password: str) -> bool:
        calls.append(self.scheme)
        return real_verify(self, password)

    monkeypatch.setattr(PasswordHash, "verify", counting)
    alice = basic("alice", ALICE_PASSWORD)
    responses = await asyncio.gather(
        *(client.get("/v2/acme/private/manifests/1", headers=alice) for _ in range(8))
    )
    assert [r.status for r in responses] == [200] * 8
    assert calls == ["bcrypt"], "concurrent requests share one verification"
    for _ in range(5):
        assert (await client.get("/v2/acme/private/manifests/1", headers=alice)).status == 200
    assert calls == ["bcrypt"], "then it is cached"


async def test_credential_files_are_reloaded_when_they_change(
    mirror: Mirror, credentials: tuple[Path, Path]
) -> None:
    client, origin = mirror
    origin.add_image("acme/private", "1")
    htpasswd, tokens = credentials
    alice = basic("alice", ALICE_PASSWORD)
    assert (await client.get("/v2/acme/private/manifests/1", headers=alice)).status == 200
    new_token = "rotated-" + os.urandom(16).hex()
    htpasswd.write_text(f"bob:{FAST_ARGON2.hash(BOB_PASSWORD)}\n")  # alice removed
    tokens.write_text(f"ci:sha256:{token_digest(new_token)}\n")
    async def alice_refused() -> bool:  # the watcher looks once a second
        return (await client.get("/v2/acme/private/manifests/1", headers=alice)).status == 401

    await eventually(alice_refused, timeout=5, step=0.1)  # "cache dropped too"
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(CI_TOKEN))).status == 401
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(new_token))).status == 200
    # A broken edit keeps the previous content.
    tokens.write_text("ci:plain-token\n")
    with structlog.testing.capture_logs() as logs:
        await eventually(lambda: any(e["event"] == "access_credentials_reload_failed" for e in logs), timeout=5)
    assert (await client.get("/v2/acme/private/manifests/1", headers=bearer(new_token))).status == 200


async def test_access_off_is_a_public_mirror(
    origin: tuple[Origin, TestServer], aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    state, server = origin
    state.add_image("acme/private", "1")
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", str(server.make_url("")).rstrip("/")),),
        default_upstream="docker.io",
    )
    client = await aiohttp_client(create_app(config))
    assert (await client.get("/v2/")).status == 200
    assert (await client.get("/v2/acme/private/manifests/1", headers=basic("x", "y"))).status == 200
    assert (await client.get("/auth/token")).status == 404


def test_unknown_users_cost_a_verification(credentials: tuple[Path, Path]) -> None:
    """Unknown users are checked against a stored hash (the decoy), so the time to answer
    does not separate them from known users with a wrong password."""
    from proxy.access.control import CredentialFiles

    files = CredentialFiles(*credentials)
    decoy = files.decoy()
    assert decoy is not None and decoy.scheme == "bcrypt"
    started = time.perf_counter()
    assert decoy.verify("anything") is False
    assert time.perf_counter() - started > 0.0005
    assert hashlib.sha256(CI_TOKEN.encode()).hexdigest() in files.tokens
