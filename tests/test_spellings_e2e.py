"""No spelling of an image changes a decision (issue 13 finding 3, issue 15 item 5).

Attacks mounted against the real daemon parts: the webhook judging AdmissionReviews shaped
as the API server sends them, and the mirror (with access rules and pull-time enforcement)
in front of a real Distribution registry. Every spelling of a host — case, default port,
leading zeros, Docker Hub's aliases, ``ns`` vs path prefix — meets the same policy and the
same access rule, or is refused as invalid; a registry that is not configured is said to
be so, and never asked."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from proxy.admission.webhook import create_webhook_app
from proxy.config.settings import (
    AccessConfig,
    AccessRule,
    CacheConfig,
    Config,
    MirrorConfig,
    TimeoutConfig,
    UpstreamConfig,
)
from proxy.http.app import create_app
from proxy.ops.metrics import Metrics
from tests.signer import generate_key
from tests.support.aio import ServerFactory
from tests.support.images import ImageFactory
from tests.support.registry import Registry
from tests.support.resolver import DictResolver

DATA = Path(__file__).parent / "data" / "admission"
ALICE = ("alice", "correct horse battery")
ALICE_HASH = "$2y$05$yUu3giJw8xQTj8/1Y5xUfO0MfqeaBHkJgXz49OR8laMd.qY9O4RSK"  # htpasswd -nbB -C 5
DIGEST = "sha256:" + "b" * 64
ENFORCE = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: acme-pinned}}
spec:
  mode: enforce
  match: {{images: ["{pattern}"]}}
  rules: {{requireDigest: true}}
"""
SPELLINGS = [
    "ghcr.io/acme/app:1.0",
    "GHCR.IO/acme/app:1.0",
    "GhCr.Io/acme/app:1.0",
    "ghcr.io:443/acme/app:1.0",
    "GHCR.IO:443/acme/app:1.0",
    "ghcr.io:0443/acme/app:1.0",
    "ghcr.io:80/acme/app:1.0",
    "ghcr.io:443/acme/team/app:1.0",
]


def pod_review(image: str) -> dict[str, Any]:
    review: dict[str, Any] = copy.deepcopy(json.loads((DATA / "pod-create.json").read_text()))
    spec = review["request"]["object"]["spec"]
    spec["containers"] = [{**spec["containers"][0], "image": image}]  # as the API server fills it in
    del spec["initContainers"], spec["volumes"]
    return review


async def webhook_client(aiohttp_client: Any, policies: Path) -> TestClient[Any, Any]:
    config = dataclasses.replace(Config(), policies=policies)
    app = create_webhook_app(config, DictResolver(), Metrics(CollectorRegistry()), structlog.get_logger())
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


async def judge(client: TestClient[Any, Any], image: str) -> dict[str, Any]:
    review = pod_review(image)
    async with client.post("/validate", json=review) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = (await response.json())["response"]
    assert answer["uid"] == review["request"]["uid"]
    return answer


# --- the webhook --------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["ghcr.io/acme/**", "GHCR.IO/acme/**", "ghcr.io:443/acme/**"])
@pytest.mark.parametrize("image", SPELLINGS)
async def test_validate_denies_every_spelling_of_a_covered_image(
    aiohttp_client: Any, tmp_path: Path, pattern: str, image: str
) -> None:
    (tmp_path / "policy.yaml").write_text(ENFORCE.format(pattern=pattern))
    client = await webhook_client(aiohttp_client, tmp_path / "policy.yaml")
    answer = await judge(client, image)
    assert answer["allowed"] is False, (pattern, image)
    assert answer["status"]["code"] == 403
    assert "policy acme-pinned requires a digest" in answer["status"]["message"]
    # ... and pinned, every spelling is admitted alike
    assert (await judge(client, f"{image}@{DIGEST}"))["allowed"] is True


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("ghcr.io./acme/app:1.0", "invalid registry host 'ghcr.io.'"),  # FQDN dot: another spelling, refused
        ("ghcr.io:99999/acme/app:1.0", "port out of range"),
        ("gh_cr.io/acme/app:1.0", "invalid registry host"),
        ("ghcr.io/ACME/app:1.0", "repository names are lowercase"),
        ("Acme/app:1.0", "'Acme' is not a registry host"),
    ],
)
async def test_validate_refuses_spellings_that_are_no_reference(
    aiohttp_client: Any, tmp_path: Path, image: str, message: str
) -> None:
    (tmp_path / "policy.yaml").write_text(ENFORCE.format(pattern="ghcr.io/acme/**"))
    client = await webhook_client(aiohttp_client, tmp_path / "policy.yaml")
    answer = await judge(client, f"{image}")
    assert answer["allowed"] is False
    assert "invalid image reference" in answer["status"]["message"] and message in answer["status"]["message"]


@pytest.mark.parametrize(
    ("written", "moved"),
    [
        ("docker.io/library/nginx:1", "mirror.local:5000/docker.io/library/nginx:1"),
        ("nginx:1", "MIRROR.LOCAL:5000/docker.io/nginx:1"),
        ("index.docker.io/nginx:1", "mirror.local:5000/index.docker.io/library/nginx:1"),
    ],
)
async def test_rewritten_images_are_judged_as_the_original_in_any_spelling(
    aiohttp_client: Any, tmp_path: Path, written: str, moved: str
) -> None:
    """``rewriteRegistry`` moves images under the mirror; an image already moved (however
    its mirror host and path are spelt) still meets the policy of the original."""
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: hub}\nspec:\n  mode: enforce\n"
        "  match: {images: ['docker.io/library/*']}\n"
        "  rules: {requireDigest: true, rewriteRegistry: 'Mirror.Local:5000'}\n"
    )
    client = await webhook_client(aiohttp_client, tmp_path / "policy.yaml")
    for image in (written, moved):
        answer = await judge(client, image)
        assert answer["allowed"] is False and "policy hub requires a digest" in answer["status"]["message"], image


@pytest.mark.parametrize(
    ("images", "error"),
    [
        (["NGINX"], "spec.match.images[0]: 'NGINX' can never match: repository names are lowercase"),
        (["docker.io/library/[abc"], "spec.match.images[0]: 'docker.io/library/[abc' can never match: '['"),
        (["ghcr.io/acme/**", "Acme/app"], "spec.match.images[1]: invalid image name 'Acme/app'"),
    ],
)
async def test_patterns_that_can_never_match_are_refused_at_load(
    aiohttp_client: Any, tmp_path: Path, images: list[str], error: str
) -> None:
    (tmp_path / "policy.yaml").write_text(ENFORCE.format(pattern='", "'.join(images)))
    client = await webhook_client(aiohttp_client, tmp_path / "policy.yaml")
    async with client.get("/readyz") as response:
        assert response.status == 503
        assert error in (await response.json())["error"]


# --- the mirror ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Mirror:
    url: str
    registry: Registry
    session: aiohttp.ClientSession
    acme: str  # acme/<slug> on the "ghcr.io" upstream: alice only
    public: str  # public/<slug>: anonymous
    digest: str

    async def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
        headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"
        async with self.session.get(f"{self.url}{path}", headers=headers) as response:
            body = await response.read()
            data = json.loads(body) if body and response.status >= 400 else {}
            data["digest"] = response.headers.get("Docker-Content-Digest")
            return response.status, data


@pytest.fixture
async def mirror(
    registry: Registry, aiohttp_server: ServerFactory, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> Any:
    slug = repo.rpartition("/")[2]
    image = image_factory.image("1", layers=[2_000])
    acme, public = f"acme/{slug}", f"public/{slug}"
    for name in (acme, public):
        await registry.apush(image.layout, "1", f"{name}:1")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{ALICE[0]}:{ALICE_HASH}\n")
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("ghcr.io", registry.url),),
        default_upstream="ghcr.io",
        timeouts=TimeoutConfig(connect=5, read=30, manifest=10, retries=0, backoff=0.05),
        access=AccessConfig(
            enabled=True,
            htpasswd=htpasswd,
            rules=(
                AccessRule(repositories=("ghcr.io/public/**",), anonymous=True),
                AccessRule(repositories=("ghcr.io/acme/**",), users=("alice",)),
            ),
        ),
    )
    server = await aiohttp_server(create_app(config))
    async with aiohttp.ClientSession() as session:
        yield Mirror(f"http://{server.host}:{server.port}", registry, session, acme, public, image.manifest_digest)


NS_SPELLINGS = ["ghcr.io", "GHCR.IO", "GhCr.Io", "ghcr.io:443", "ghcr.io:0443", "GHCR.IO:80"]
PREFIX_SPELLINGS = ["ghcr.io", "GHCR.IO", "GhCr.Io", "ghcr.io:443", "ghcr.io:0443"]


def paths(name: str) -> list[str]:
    return [f"/v2/{name}/manifests/1?ns={ns}" for ns in NS_SPELLINGS] + [
        f"/v2/{prefix}/{name}/manifests/1" for prefix in PREFIX_SPELLINGS
    ] + [f"/v2/{name}/manifests/1"]  # default_upstream


async def test_access_rules_meet_every_spelling(mirror: Mirror) -> None:
    since = await mirror.registry.amark()
    for path in paths(mirror.acme):
        status, body = await mirror.get(path)
        assert status == 401, (path, body)
        assert body["errors"][0]["code"] == "UNAUTHORIZED"
        assert f"authentication required to pull ghcr.io/{mirror.acme}" in body["errors"][0]["message"]
    # nothing refused reached the upstream
    assert await mirror.registry.acount_requests(None, rf"^/v2/{mirror.acme}/", since=since) == 0
    for path in paths(mirror.acme):
        status, body = await mirror.get(path, ALICE)
        assert (status, body["digest"]) == (200, mirror.digest), path
    for path in paths(mirror.public):
        status, body = await mirror.get(path)
        assert (status, body["digest"]) == (200, mirror.digest), path


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        ("/v2/quay.io/foo/bar/manifests/1", 404, "NAME_UNKNOWN", "registry quay.io is not mirrored here"),
        ("/v2/QUAY.IO:443/foo/bar/manifests/1", 404, "NAME_UNKNOWN", "registry quay.io is not mirrored here"),
        ("/v2/foo/bar/manifests/1?ns=quay.io", 404, "NAME_UNKNOWN", "registry quay.io is not mirrored here"),
        ("/v2/localhost:5000/foo/blobs/" + DIGEST, 404, "NAME_UNKNOWN", "registry localhost:5000 is not mirrored"),
        ("/v2/ghcr.io:8443/public/x/manifests/1", 404, "NAME_UNKNOWN", "registry ghcr.io:8443 is not mirrored"),
        ("/v2/ghcr.io/Public/x/manifests/1", 400, "NAME_INVALID", "repository names are lowercase"),
        ("/v2/ghcr.io./public/x/manifests/1", 400, "NAME_INVALID", "invalid registry host 'ghcr.io.'"),
        ("/v2/public/x/manifests/1?ns=ghcr.io.", 400, "NAME_INVALID", "invalid registry host 'ghcr.io.'"),
    ],
)
async def test_unmirrored_and_invalid_registries_are_said_so(
    mirror: Mirror, path: str, status: int, code: str, message: str
) -> None:
    since = await mirror.registry.amark()
    got, body = await mirror.get(path, ALICE)
    assert got == status and body["errors"][0]["code"] == code and message in body["errors"][0]["message"], body
    assert await mirror.registry.acount_requests(None, since=since) == 0


# --- pull-time enforcement ------------------------------------------------------------------------
async def test_pull_time_policies_match_by_registry_host_not_upstream_name(
    registry: Registry, aiohttp_server: ServerFactory, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    """An upstream configured under a name ("private") is still the registry its URL names:
    a policy on that host covers pulls through ``/v2/private/...``, ``?ns=`` and the host
    prefix alike (pull-time enforcement once judged ``private/REPO`` and matched nothing)."""
    image = image_factory.image("1", layers=[2_000])
    await registry.apush(image.layout, "1", f"{repo}:1")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "ci.pub").write_bytes(generate_key().public_pem)
    host = registry.host.upper().replace("127.0.0.1:", "127.0.0.1:0")  # another spelling in the policy
    (policies / "signed.yaml").write_text(
        "apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: signed}\nspec:\n  mode: enforce\n"
        f"  match: {{images: ['{host}/{repo}']}}\n"
        "  rules: {signatures: {keys: [{name: ci, publicKeyFile: ci.pub}]}}\n"
    )
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("private", registry.url),),
        default_upstream="private",
        mirror=MirrorConfig(enforce_policies=True),
        policies=policies,
    )
    server = await aiohttp_server(create_app(config))
    base = f"http://{server.host}:{server.port}"
    async with aiohttp.ClientSession() as session:
        for path in (
            f"/v2/private/{repo}/manifests/1",
            f"/v2/{repo}/manifests/1",
            f"/v2/{repo}/manifests/1?ns={registry.host}",
            f"/v2/{repo}/manifests/1?ns=private",
            f"/v2/{registry.host}/{repo}/manifests/1",
            f"/v2/{repo}/manifests/{image.manifest_digest}",
        ):
            async with session.get(f"{base}{path}") as response:
                assert response.status == 403, (path, await response.text())
                error = (await response.json())["errors"][0]
            assert error["code"] == "DENIED" and "policy signed requires a valid signature" in error["message"]
