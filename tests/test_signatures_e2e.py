"""Content trust end to end: images signed by the test signer (what cosign writes, both
formats) pushed with skopeo into the real registry, verified by the webhook through the
mirror's cache."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config.settings import AdmissionConfig, CacheConfig, Config, MirrorConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS
from tests.signer import Artifact, Rekor, SigningKey, generate_key, sign_bundle, sign_legacy, write_oci_layout
from tests.support.admission import WebhookWorld, pod_review
from tests.support.aio import ServerFactory
from tests.support.containerd import Containerd
from tests.support.images import OCI_INDEX, ImageFactory
from tests.support.procs import CommandError, free_port
from tests.support.registry import Registry

DATA = Path(__file__).parent / "data" / "admission"


@dataclass
class World(WebhookWorld):
    keys: dict[str, SigningKey]
    rekor: Rekor
    app: web.Application


def policies(directory: Path, repo: str, keys: dict[str, SigningKey], rekor: Rekor) -> Path:
    (directory / "keys").mkdir(parents=True)
    (directory / "keys" / "ci.pub").write_bytes(keys["ci"].public_pem)
    (directory / "keys" / "rekor.pub").write_bytes(rekor.public_pem)
    release = keys["release"].public_pem.decode().strip().replace("\n", "\n            ")
    other = json.dumps(keys["other"].public_pem.decode())  # a JSON string is a YAML string
    (directory / "signed.yaml").write_text(f"""\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: one-of-two}}
spec:
  mode: enforce
  match: {{images: ["docker.io/{repo}/single/**"]}}
  rules:
    resolveTags: true
    signatures:
      keys:
        - name: release
          publicKey: |
            {release}
        - name: ci
          publicKeyFile: keys/ci.pub
---
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: two-of-two}}
spec:
  mode: enforce
  match: {{images: ["docker.io/{repo}/both/**"]}}
  rules:
    resolveTags: true
    signatures:
      keys:
        - {{name: release, publicKeyFile: keys/ci.pub}}
        - {{name: ci2, publicKey: {other}}}
      threshold: 2
---
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: logged}}
spec:
  mode: enforce
  match: {{images: ["docker.io/{repo}/logged/**"]}}
  rules:
    resolveTags: true
    signatures:
      keys: [{{name: ci, publicKeyFile: keys/ci.pub}}]
      transparencyLog: {{publicKeyFile: keys/rekor.pub}}
""")
    return directory


async def push_artifact(registry: Registry, artifact: Artifact, repo: str, tmp: Path) -> None:
    layout = write_oci_layout(tmp / f"sig-{artifact.tag}", artifact)
    await registry.apush(layout, artifact.tag, f"{repo}:{artifact.tag}")


@pytest.fixture
async def world(registry: Registry, aiohttp_server: ServerFactory, repo: str, tmp_path: Path) -> AsyncIterator[World]:
    keys = {name: generate_key() for name in ("release", "ci", "other", "stranger")}
    rekor = Rekor()
    port = free_port()
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache", tag_ttl=0.0),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        admission=AdmissionConfig(enabled=True, listen=("127.0.0.1", port)),
        policies=policies(tmp_path / "policies", repo, keys, rekor),
    )
    app = create_app(config)
    await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        yield World(registry, f"http://127.0.0.1:{port}", session, repo, keys, rekor, app)


async def admit(world: World, image: str, endpoint: str = "mutate") -> dict[str, Any]:
    return await world.answer(endpoint, pod_review(image))


async def push_image(world: World, factory: ImageFactory, name: str, tag: str = "1") -> str:
    image = factory.image(tag, layers=[2_000])
    await world.registry.apush(image.layout, tag, f"{world.repo}/{name}:{tag}")
    return image.manifest_digest


def pinned(answer: dict[str, Any]) -> str:
    (op,) = json.loads(base64.b64decode(answer["patch"]))
    value: str = op["value"]
    return value


@pytest.mark.parametrize(
    ("name", "signers", "fmt", "allowed", "reason"),
    [
        ("single/by-release", ["release"], "legacy", True, None),
        ("single/by-ci", ["ci"], "legacy", True, None),
        ("single/bundle", ["ci"], "bundle", True, None),
        ("single/unsigned", [], "legacy", False, "no signature found"),
        ("single/stranger", ["stranger"], "legacy", False, "signature does not verify"),
        ("both/one-signer", ["ci"], "legacy", False, "1 of 2 required signatures verified"),
        ("both/two-signers", ["ci", "other"], "legacy", True, None),
        ("logged/no-entry", ["ci"], "legacy", False, "not in transparency log"),
        ("logged/with-entry", ["ci"], "legacy+rekor", True, None),
    ],
)
async def test_admission_verifies_signatures(
    world: World,
    image_factory: ImageFactory,
    tmp_path: Path,
    name: str,
    signers: list[str],
    fmt: str,
    allowed: bool,
    reason: str | None,
) -> None:
    digest = await push_image(world, image_factory, name)
    ref = f"docker.io/{world.repo}/{name}"
    keys = [world.keys[s] for s in signers]
    if signers and fmt.startswith("legacy"):
        rekor = world.rekor if fmt == "legacy+rekor" else None
        await push_artifact(world.registry, sign_legacy(digest, ref, keys, rekor), f"{world.repo}/{name}", tmp_path)
    elif signers:
        artifact = sign_bundle(digest, ref, keys)
        layout = write_oci_layout(tmp_path / "bundle", artifact)
        await world.registry.apush(layout, artifact.tag, f"{world.repo}/{name}:{artifact.tag}")
    answer = await admit(world, f"{ref}:1")
    assert answer["allowed"] is allowed, answer
    if allowed:
        assert pinned(answer) == f"{ref}:1@{digest}", "the verified digest is what the pod runs"
        validated = await admit(world, f"{ref}:1@{digest}", "validate")
        assert validated["allowed"] is True, "the pinned image passes the validating webhook"
    else:
        message = answer["status"]["message"]
        assert reason is not None and reason in message
        assert 'container "app"' in message and "signature" in message
        validated = await admit(world, f"{ref}@{digest}", "validate")
        assert validated["allowed"] is False and reason in validated["status"]["message"]


async def test_verification_is_cached_and_a_moved_tag_is_verified_again(
    world: World, image_factory: ImageFactory, tmp_path: Path
) -> None:
    name = "single/moving"
    ref = f"docker.io/{world.repo}/{name}"
    digest = await push_image(world, image_factory, name)
    await push_artifact(world.registry, sign_legacy(digest, ref, [world.keys["ci"]]), f"{world.repo}/{name}", tmp_path)
    for _ in range(3):
        assert (await admit(world, f"{ref}:1"))["allowed"] is True
    registry = world.app[METRICS].registry
    assert registry.get_sample_value("pullgate_signature_verification_cache_total", {"result": "hit"}) >= 2
    # The tag now points at an unsigned image: the cache (keyed by digest) cannot help it.
    await push_image(world, image_factory, name)
    answer = await admit(world, f"{ref}:1")
    assert answer["allowed"] is False and "no signature found" in answer["status"]["message"]


async def test_multi_arch_index_signed_at_the_index(world: World, image_factory: ImageFactory, tmp_path: Path) -> None:
    index = image_factory.index("1", layers=[1_000])
    name = "single/multi"
    await world.registry.apush(index.layout, "1", f"{world.repo}/{name}:1")
    ref = f"docker.io/{world.repo}/{name}"
    await push_artifact(
        world.registry, sign_legacy(index.index_digest, ref, [world.keys["release"]]), f"{world.repo}/{name}", tmp_path
    )
    answer = await admit(world, f"{ref}:1")
    assert answer["allowed"] is True
    assert pinned(answer) == f"{ref}:1@{index.index_digest}"
    assert OCI_INDEX  # the pinned digest is the index: every platform of it is covered


async def test_mirror_enforces_signatures_at_pull_time(
    registry: Registry,
    containerd: Containerd,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
) -> None:
    keys = {name: generate_key() for name in ("release", "ci", "other")}
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        mirror=MirrorConfig(enforce_policies=True),
        policies=policies(tmp_path / "policies", repo, keys, Rekor()),
    )
    server = await aiohttp_server(create_app(config))
    mirror = f"http://{server.host}:{server.port}"
    signed = image_factory.index("1", layers=[3_000])
    await registry.apush(signed.layout, "1", f"{repo}/single/signed:1")
    ref = f"docker.io/{repo}/single/signed"
    artifact = sign_legacy(signed.index_digest, ref, [keys["ci"]])
    await push_artifact(registry, artifact, f"{repo}/single/signed", tmp_path)
    unsigned = image_factory.image("1", layers=[3_000])
    await registry.apush(unsigned.layout, "1", f"{repo}/single/unsigned:1")
    # Signed at the index: containerd's pull (tag, index, platform manifest, blobs) succeeds.
    digest = await containerd.apull(f"{ref}:1", mirror, namespace=containerd.new_namespace())
    assert digest == signed.index_digest
    # Unsigned: the manifest is refused with the reason.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mirror}/v2/{repo}/single/unsigned/manifests/1") as response:
            assert response.status == 403
            error = (await response.json())["errors"][0]
        assert error["code"] == "DENIED" and "no signature found" in error["message"]
        # Images no policy covers pull as usual; so do the signature objects themselves.
        async with session.get(f"{mirror}/v2/{repo}/single/signed/manifests/{artifact.tag}") as response:
            assert response.status == 200
    with pytest.raises(CommandError):
        await containerd.apull(
            f"docker.io/{repo}/single/unsigned:1", mirror, namespace=containerd.new_namespace(), timeout=30
        )
