"""Keyless content trust end to end: real signatures in the real registry (Debian's
Distribution), read through the mirror's cache, judged by the webhook.

- containers/image's legacy keyless signature (a real ``cosign sign`` with a Fulcio
  certificate and a Rekor SET, verified offline against the shipped public-good root): the
  signed image manifest is planted in the registry's storage (its layers are not in the
  vector) and the ``.sig`` artifact pushed with skopeo, annotations byte for byte;
- a cosign v3 bundle signed by the private Sigstore of tests/sigstore_fakes.py (Rekor v2
  + RFC 3161 timestamp) and an SLSA provenance attestation, on a real image, found through
  the referrers tag schema, checked against a ``trustedRoot:`` file.
Each is admitted with the right identity and denied with a wrong one, saying what was
found and what was wanted."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config.settings import AdmissionConfig, CacheConfig, Config, MirrorConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS
from tests.signer import Artifact, SimpleSigningLayer, bundle_artifact, legacy_artifact, write_oci_layout
from tests.sigstore_fakes import GITHUB, T0, FakeSigstore, statement
from tests.support.admission import WebhookWorld
from tests.support.admission import pod_review as review
from tests.support.aio import ServerFactory
from tests.support.images import ImageFactory
from tests.support.procs import free_port
from tests.support.registry import Registry

VECTOR = Path(__file__).parent / "data" / "cosign" / "containers-image-fulcio-rekor-valid"
REAL_SUBJECT, REAL_ISSUER = "mitr@redhat.com", "https://github.com/login/oauth"
RELEASE = "https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*"
SLSA1 = "https://slsa.dev/provenance/v1"


def policies(directory: Path, repo: str, sigstore: FakeSigstore) -> Path:
    directory.mkdir(parents=True)
    sigstore.write_trusted_root(directory / "fake_trusted_root.json")
    docs = [
        ("real-keyless", f"docker.io/{repo}/real/**", {
            "signatures": {"keyless": [{"issuer": REAL_ISSUER, "subject": REAL_SUBJECT}]}}),
        ("real-wrong-identity", f"docker.io/{repo}/wrong/**", {
            "signatures": {"keyless": [{"issuer": REAL_ISSUER, "subject": "someone-else@redhat.com"}]}}),
        ("bundle-keyless", f"docker.io/{repo}/bundle/**", {"signatures": {
            "keyless": [{"issuer": GITHUB, "subject": RELEASE, "extensions": {"sourceRepositoryOwnerURI": "https://github.com/acme"}}],
            "trustedRoot": "fake_trusted_root.json"}}),
        ("bundle-provenance", f"docker.io/{repo}/bundle/**", {"attestations": [{
            "name": "provenance", "predicateType": SLSA1, "trustedRoot": "fake_trusted_root.json",
            "keyless": [{"issuer": GITHUB, "subjectRegExp": "https://github\\.com/acme/.*"}],
            "conditions": {"runDetails.builder.id": "https://github.com/actions/runner/*"}}]}),
    ]  # fmt: skip
    text = "---\n".join(
        json.dumps({"apiVersion": "pullgate.dev/v1", "kind": "ImagePolicy", "metadata": {"name": name},
                    "spec": {"mode": "enforce", "match": {"images": [images]}, "rules": rules}}) + "\n"
        for name, images, rules in docs
    )  # fmt: skip
    (directory / "keyless.yaml").write_text(text)  # JSON is YAML
    return directory


@dataclass
class World(WebhookWorld):
    sigstore: FakeSigstore
    app: web.Application


@pytest.fixture
async def world(registry: Registry, aiohttp_server: ServerFactory, repo: str, tmp_path: Path) -> AsyncIterator[World]:
    sigstore = FakeSigstore()
    port = free_port()
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache", tag_ttl=0.0),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        admission=AdmissionConfig(enabled=True, listen=("127.0.0.1", port)),
        policies=policies(tmp_path / "policies", repo, sigstore),
    )
    app = create_app(config)
    await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        yield World(registry, f"http://127.0.0.1:{port}", session, repo, sigstore, app)


async def validate(world: World, image: str) -> dict[str, Any]:
    return await world.answer("validate", review(image))


async def push(world: World, artifact: Artifact, repository: str, tmp: Path) -> None:
    layout = write_oci_layout(tmp / f"layout-{repository.replace('/', '-')}-{artifact.tag}", artifact)
    await world.registry.apush(layout, artifact.tag, f"{repository}:{artifact.tag}")


def real_signature() -> Artifact:
    annotations = json.loads((VECTOR / "annotations.json").read_text())
    signature = base64.b64decode(annotations.pop("dev.cosignproject.cosign/signature"))
    bundle = annotations.pop("dev.sigstore.cosign/bundle")
    layer = SimpleSigningLayer((VECTOR / "payload.json").read_bytes(), signature, bundle, extra=annotations)
    digest = json.loads(layer.payload)["critical"]["image"]["docker-manifest-digest"]
    return legacy_artifact(digest, [layer])


@pytest.mark.parametrize(
    ("name", "allowed", "message"),
    [
        ("real", True, None),
        ("wrong", False, "certificate identity mismatch (identity 'mitr@redhat.com' (issuer https://github.com/login/oauth),"
                         " wanted 'someone-else@redhat.com')"),
    ],
)  # fmt: skip
async def test_real_legacy_keyless_signature(
    world: World, tmp_path: Path, name: str, allowed: bool, message: str | None
) -> None:
    repository = f"{world.repo}/{name}/fulcio-rekor"
    digest = world.registry.plant_manifest(repository, "1", (VECTOR / "image-manifest.json").read_bytes())
    await push(world, real_signature(), repository, tmp_path)
    for _ in range(2):  # the second review is a cache hit
        answer = await validate(world, f"docker.io/{repository}@{digest}")
        assert answer["allowed"] is allowed, answer
    if message is not None:
        assert message in answer["status"]["message"]
    metrics = world.app[METRICS].registry
    assert metrics.get_sample_value("pullgate_signature_verification_cache_total", {"result": "hit"}) >= 1
    result = "verified" if allowed else "failed"
    labels = {"result": result, "key": REAL_SUBJECT if allowed else "someone-else@redhat.com", "issuer": REAL_ISSUER}
    assert metrics.get_sample_value("pullgate_signature_verifications_total", labels) == 1


@pytest.mark.parametrize(
    ("subject", "builder", "allowed", "message"),
    [
        ("https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1", "https://github.com/actions/runner/x",
         True, None),
        ("https://github.com/acme/app/.github/workflows/ci.yml@refs/heads/main", "https://github.com/actions/runner/x",
         False, "wanted 'https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*'"),
        ("https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1", "https://evil.example/builder",
         False, "runDetails.builder.id is 'https://evil.example/builder', wanted 'https://github.com/actions/runner/*'"),
    ],
)  # fmt: skip
async def test_keyless_bundle_and_provenance(
    world: World,
    image_factory: ImageFactory,
    tmp_path: Path,
    subject: str,
    builder: str,
    allowed: bool,
    message: str | None,
) -> None:
    repository = f"{world.repo}/bundle/app"
    image = image_factory.image("1", layers=[1_000])
    await world.registry.apush(image.layout, "1", f"{repository}:1")
    ref = f"docker.io/{repository}"
    signer = world.sigstore.issue(subject, extensions={"sourceRepositoryOwnerURI": "https://github.com/acme"})
    stamped = T0 + timedelta(minutes=2)
    signature = world.sigstore.dsse_bundle(statement(image.manifest_digest, ref), signer, rekor=2, timestamp=stamped)
    predicate = {"runDetails": {"builder": {"id": builder}}}
    provenance = world.sigstore.dsse_bundle(statement(image.manifest_digest, ref, SLSA1, predicate), signer)
    artifact = bundle_artifact(
        image.manifest_digest,
        image.media_type,
        len(image.manifest_bytes),
        [json.dumps(signature).encode(), json.dumps(provenance).encode()],
    )
    await world.registry.apush(
        write_oci_layout(tmp_path / "bundles", artifact), artifact.tag, f"{repository}:{artifact.tag}"
    )
    answer = await validate(world, f"{ref}@{image.manifest_digest}")
    assert answer["allowed"] is allowed, answer
    if message is not None:
        assert message in answer["status"]["message"]


async def test_pull_time_enforcement_uses_the_same_keyless_verification(
    registry: Registry, aiohttp_server: ServerFactory, repo: str, tmp_path: Path
) -> None:
    """``mirror.enforce_policies``: the mirror refuses the manifest of an image whose keyless
    signature names another identity, and serves the one the policy's identity signed."""
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        mirror=MirrorConfig(enforce_policies=True),
        policies=policies(tmp_path / "policies", repo, FakeSigstore()),
    )
    server = await aiohttp_server(create_app(config))
    mirror = f"http://{server.host}:{server.port}"
    async with aiohttp.ClientSession() as session:
        for name, status in (("real", 200), ("wrong", 403)):
            repository = f"{repo}/{name}/fulcio-rekor"
            digest = registry.plant_manifest(repository, "1", (VECTOR / "image-manifest.json").read_bytes())
            artifact = real_signature()
            layout = write_oci_layout(tmp_path / f"sig-{name}", artifact)
            await registry.apush(layout, artifact.tag, f"{repository}:{artifact.tag}")
            async with session.get(f"{mirror}/v2/{repository}/manifests/{digest}") as response:
                assert response.status == status, await response.text()
                if status == 403:
                    message = (await response.json())["errors"][0]["message"]
                    assert "certificate identity mismatch (identity 'mitr@redhat.com'" in message
