"""Image content rules end to end: images built with each property (root and non-root
users, secret-looking env and history, large and small, single- and multi-arch, old and
new, with and without labels and base annotations) pushed with skopeo into the real
registry, judged by the daemon's ``/validate`` through the mirror's cache — every rule in
each mode (enforce: deny, warn: warning, audit: audit annotation)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cli import main
from proxy.config.settings import AdmissionConfig, CacheConfig, Config, UpstreamConfig
from proxy.http.app import create_app
from proxy.policy.sites import clip
from tests.support.admission import WebhookWorld, pod_review
from tests.support.aio import ServerFactory
from tests.support.images import OCI_INDEX, OciLayout, build_image
from tests.support.procs import free_port
from tests.support.registry import Registry

DATA = Path(__file__).parent / "data" / "admission"
SOURCE = "org.opencontainers.image.source"
BASE = "org.opencontainers.image.base.name"
MODES = {"enforce": "deny", "warn": "warn", "audit": "audit"}  # namespace = mode of its policy
RULES = """\
      denyRootUser: true
      denySecretsInEnv: true
      denySecretsInHistory: true
      maxCompressedSize: 64KiB
      maxLayers: 3
      requirePlatforms: [linux/amd64, linux/arm64]
      maxAge: 90d
      requireLabels: [org.opencontainers.image.source]
      allowedBaseImages: ["docker.io/library/python:*", "gcr.io/distroless/**"]
"""
NPM_TOKEN = "npm" + "_" + "a1B2c3D4e5F6g7H8i9J0a1B2c3D4e5F6g7H8"  # assembled: not a literal token here
# An image that passes every rule: what the cases below change one property of.
GOOD: dict[str, Any] = {
    "user": "1000",
    "env": [
        "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
        "GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305",
        "PYTHON_VERSION=3.12.1",
        "PYTHON_SHA256=8de0e5a4f5b1e0c0c8b2b3f5e7e1a1b2c3d4e5f60718293a4b5c6d7e8f901234",
        "TOKEN_URL=https://auth.example.com/oauth/token",
        "DB_PASSWORD_FILE=/run/secrets/db",
        "API_TOKEN=",
        "HOME=/home/app",
    ],
    "history": [
        "/bin/sh -c #(nop) ADD file:5d673e5c7c4a8f1d2b0c9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b in / ",
        "ENV GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305",
        "RUN |1 TARGETARCH=amd64 /bin/sh -c pip install --no-cache-dir . # buildkit",
    ],
    "labels": {SOURCE: "https://github.com/acme/app", BASE: "docker.io/library/python:3.12-slim"},
    "layers": [1_000, 1_000],
    "platforms": ("linux/amd64", "linux/arm64"),
}


def days_ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build(directory: Path, **changes: Any) -> Path:
    """An OCI layout tagged ``1``: GOOD with ``changes``; an index unless one platform."""
    props = {"created": days_ago(10), **GOOD, **changes}
    platforms = props.pop("platforms")
    if len(platforms) == 1:
        build_image(directory, "1", platform=platforms[0], **props)
        return directory
    images = [build_image(directory, None, platform=p, **props) for p in platforms]
    layout = OciLayout(directory)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [i.descriptor().to_json() for i in images]}
    descriptor, _ = layout.write_json(index, OCI_INDEX)
    layout.tag(descriptor, "1")
    return directory


@dataclass
class World(WebhookWorld):
    tmp: Path

    async def push(self, name: str, **changes: Any) -> str:
        layout = build(self.tmp / f"layout-{name}", **changes)
        await self.registry.apush(layout, "1", f"{self.repo}/{name}:1")
        return f"docker.io/{self.repo}/{name}:1"


def policies(directory: Path, repo: str) -> Path:
    directory.mkdir(parents=True)
    docs = [
        f"apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {{name: hygiene-{mode}}}\n"
        f"spec:\n  mode: {mode}\n  match: {{images: ['docker.io/{repo}/**'], namespaces: [{mode}]}}\n"
        f"  rules:\n    image:\n{RULES}"
        for mode in MODES
    ]
    (directory / "hygiene.yaml").write_text("---\n".join(docs))
    return directory


async def start(
    registry_url: str, aiohttp_server: ServerFactory, tmp: Path, repo: str, **admission: Any
) -> tuple[web.Application, str]:
    port = free_port()
    config = Config(
        cache=CacheConfig(dir=tmp / "cache", tag_ttl=0.0),
        upstreams=(UpstreamConfig("docker.io", registry_url),),
        admission=AdmissionConfig(enabled=True, listen=("127.0.0.1", port), **admission),
        policies=policies(tmp / "policies", repo),
    )
    app = create_app(config)
    await aiohttp_server(app)
    return app, f"http://127.0.0.1:{port}"


@pytest.fixture
async def world(registry: Registry, aiohttp_server: ServerFactory, repo: str, tmp_path: Path) -> AsyncIterator[World]:
    _, webhook = await start(registry.url, aiohttp_server, tmp_path, repo)
    async with aiohttp.ClientSession() as session:
        yield World(registry, webhook, session, repo, tmp_path)


async def validate(
    world: World,
    image: str,
    namespace: str,
    pod: dict[str, Any] | None = None,
    container: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = pod_review(image, namespace=namespace, pod_security=pod, container_security=container)
    return await world.answer("validate", body)


@pytest.mark.parametrize(
    ("name", "changes", "pod", "container", "phrase"),
    [
        ("good", {}, None, None, None),
        # denyRootUser, with the securityContext overrides
        ("no-user", {"user": None}, None, None, "image.denyRootUser: runs as root (image sets no user)"),
        ("uid-0", {"user": "0:0"}, None, None, 'image.denyRootUser: runs as root (image user "0:0")'),
        ("root-non-root-pod", {"user": "root"}, {"runAsNonRoot": True}, None, None),
        ("root-as-1000", {"user": "root"}, {"runAsUser": 0}, {"runAsUser": 1000}, None),  # container wins
        ("made-root", {}, None, {"runAsUser": 0}, "image.denyRootUser: runs as root (securityContext.runAsUser: 0)"),
        # secrets: the variable and the pattern, never the value
        (
            "env-secret",
            {"env": [*GOOD["env"], "DB_PASSWORD=hunter2-x9"]},
            None,
            None,
            "image.denySecretsInEnv: secret-looking env DB_PASSWORD (generic-password)",
        ),
        (
            "history-secret",
            {"history": [*GOOD["history"], f"RUN |1 NPM_TOKEN={NPM_TOKEN} /bin/sh -c npm ci # buildkit"]},
            None,
            None,
            "image.denySecretsInHistory: secret-looking history[3] NPM_TOKEN (npm-token)",
        ),
        # size and layers of the linux/amd64 image
        ("large", {"layers": [100_000]}, None, None, "image.maxCompressedSize: linux/amd64 image is 100."),
        ("many-layers", {"layers": [100] * 4}, None, None, "image.maxLayers: linux/amd64 image has 4 layers (max 3)"),
        # platforms
        (
            "single-arch",
            {"platforms": ("linux/amd64",)},
            None,
            None,
            "image.requirePlatforms: missing linux/arm64 (offers linux/amd64)",
        ),
        # age
        ("old", {"created": "2020-01-01T00:00:00Z"}, None, None, "image.maxAge: built 2020-01-01, "),
        # labels and base image
        (
            "no-source",
            {"labels": {BASE: "python:3.12"}},
            None,
            None,
            f"image.requireLabels: missing label {SOURCE}",
        ),
        (
            "base-unknown",
            {"labels": {SOURCE: "https://x"}},
            None,
            None,
            f"image.allowedBaseImages: base image unknown (no {BASE} annotation or label)",
        ),
        (
            "base-alpine",
            {"labels": {SOURCE: "https://x", BASE: "alpine:3.19"}},
            None,
            None,
            "image.allowedBaseImages: base image docker.io/library/alpine:3.19 is not allowed",
        ),
        (
            "base-annotated",
            {"labels": {SOURCE: "https://x"}, "annotations": {BASE: "gcr.io/distroless/python3-debian12:nonroot"}},
            None,
            None,
            None,
        ),
    ],
)
async def test_rule_in_every_mode(
    world: World,
    name: str,
    changes: dict[str, Any],
    pod: dict[str, Any] | None,
    container: dict[str, Any] | None,
    phrase: str | None,
) -> None:
    image = await world.push(name, **changes)
    for namespace, outcome in MODES.items():
        answer = await validate(world, image, namespace, pod, container)
        text = json.dumps(answer)
        assert "hunter2" not in text and NPM_TOKEN not in text, "secrets are never repeated"
        if phrase is None:
            assert answer["allowed"] is True and "warnings" not in answer and "auditAnnotations" not in answer, answer
            continue
        prefix = f'container "app" image "{image}": policy hygiene-{namespace} {phrase}'
        if outcome == "deny":
            assert answer["allowed"] is False
            assert answer["status"]["message"].startswith(prefix), answer["status"]["message"]
        elif outcome == "warn":
            assert answer["allowed"] is True
            (warning,) = answer["warnings"]
            assert warning.startswith(clip(prefix)[:-1]), warning
        else:
            assert answer["allowed"] is True and "warnings" not in answer
            assert answer["auditAnnotations"]["hygiene-audit"].startswith(prefix)


async def test_config_is_fetched_once_through_the_cache(world: World) -> None:
    image = await world.push("cached", user=None)
    first = await validate(world, image, "enforce")
    mark = await world.registry.amark()
    second = await validate(world, image, "enforce")
    assert first["allowed"] is False and second == first
    assert await world.registry.acount_requests("GET", r"/blobs/", since=mark) == 0, "config served from the cache"


class HangingBlobs:
    """An upstream that forwards to the real registry but holds blob requests until
    ``release`` is set: the config fetch can only end by the webhook's deadline."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.blob_requests = 0
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if "/blobs/" in request.path:
            self.blob_requests += 1
            await self.release.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "authorization")}
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, self.target + request.path_qs, headers=headers) as upstream,
        ):
            body = await upstream.read()
            keep = ("content-type", "docker-content-digest")
            kept = {k: v for k, v in upstream.headers.items() if k.lower() in keep}
            return web.Response(status=upstream.status, body=body, headers=kept)


async def test_config_fetch_is_bounded_by_the_webhook_deadline(
    registry: Registry, aiohttp_server: ServerFactory, repo: str, tmp_path: Path
) -> None:
    hanging = HangingBlobs(registry.url)
    upstream = await aiohttp_server(hanging.app())
    _, webhook = await start(
        f"http://127.0.0.1:{upstream.port}", aiohttp_server, tmp_path, repo, deadline=0.5, on_timeout="deny"
    )
    layout = build(tmp_path / "layout")
    await registry.apush(layout, "1", f"{repo}/slow:1")
    async with aiohttp.ClientSession() as session:
        world = World(registry, webhook, session, repo, tmp_path)
        started = time.monotonic()
        answer = await validate(world, f"docker.io/{repo}/slow:1", "enforce")
        hanging.release.set()
    assert time.monotonic() - started < 3.0
    assert hanging.blob_requests >= 1, "the config blob was asked for"
    assert answer["allowed"] is False
    assert "did not finish within 0.5s; denied (admission.on_timeout: deny)" in answer["status"]["message"]


def test_policy_check_judges_content_through_the_cache(
    registry: Registry, repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.push(build(tmp_path / "layout", user=None), "1", f"{repo}/tool:1")
    policy_dir = policies(tmp_path / "policies", repo)
    (tmp_path / "config.yaml").write_text(
        f"cache: {{dir: {tmp_path / 'cache'}}}\nupstreams: [{{name: docker.io, url: '{registry.url}'}}]\n"
    )
    image = f"docker.io/{repo}/tool:1"
    (tmp_path / "pod.yaml").write_text(
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: t, namespace: enforce}}\n"
        f"spec: {{containers: [{{name: app, image: '{image}'}}]}}\n"
    )
    base = ["policy", "check", "--policies", str(policy_dir), str(tmp_path / "pod.yaml")]
    label = f"{tmp_path / 'pod.yaml'}#1 enforce/Pod/t"
    where = f'container "app" image "{image}": policy hygiene-enforce'

    assert main(base) == 0  # offline: not judged, and says so
    out = capsys.readouterr().out.splitlines()
    assert f"SKIP   {label}  {where} not evaluated offline: image rules (use --config or --cache-dir)" in out
    assert out[-1] == (
        "1 image, 1 decision: 0 allow, 0 warn, 0 audit, 0 deny, 1 not evaluated offline (use --config or --cache-dir)"
    )

    assert main([*base[:2], "--config", str(tmp_path / "config.yaml"), *base[2:]]) == 1
    out = capsys.readouterr().out.splitlines()
    assert (
        f"DENY   {label}  {where} image.denyRootUser: runs as root (image sets no user) [hygiene-enforce/image]" in out
    )
    assert out[-1] == "1 image, 1 decision: 0 allow, 0 warn, 0 audit, 1 deny"

    # The cache now holds the image: --cache-dir alone (default upstreams) judges it from there.
    assert main([*base[:2], "--cache-dir", str(tmp_path / "cache"), *base[2:]]) == 1
    assert "image.denyRootUser: runs as root" in capsys.readouterr().out
