"""Pull-time enforcement cannot be talked out of its check (issue 13 finding 4).

The attack: with ``mirror.enforce_policies`` on, an unsigned runnable image was served (200)
when its manifest carried an annotation mentioning the sigstore bundle media type, or when
it was pushed under a tag shaped like a signature tag (``sha256-<hex>``,
``sha256-<hex>.sig``). Mounted here against the real registry (Debian's docker-registry,
images pushed with skopeo) through a mirror enforcing a signature policy, with every
disguise we could think of — and the real signature objects, which must still be served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.settings import CacheConfig, Config, MirrorConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.oci.artifacts import SIGSTORE_BUNDLE, SIMPLESIGNING
from tests.signer import Rekor, SigningKey, generate_key, sign_bundle, sign_legacy, write_oci_layout
from tests.support.aio import ServerFactory
from tests.support.containerd import Containerd
from tests.support.images import OCI_INDEX, OCI_MANIFEST, ImageFactory, ImageInfo, OciLayout
from tests.support.procs import CommandError
from tests.support.registry import Registry
from tests.test_signatures_e2e import policies

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
BUNDLE_NOTE = {"org.example.note": f"verified with {SIGSTORE_BUNDLE}", SIGSTORE_BUNDLE: "true"}


@dataclass
class World:
    registry: Registry
    mirror: str
    repo: str
    keys: dict[str, SigningKey]
    tmp: Path
    factory: ImageFactory
    session: aiohttp.ClientSession
    pushes: int = 0

    def ref(self, name: str) -> str:
        return f"docker.io/{self.repo}/single/{name}"

    async def push_image(self, name: str, tag: str, **options: Any) -> ImageInfo:
        image = self.factory.image(tag, layers=[2_000], **options)
        await self.registry.apush(image.layout, tag, f"{self.repo}/single/{name}:{tag}")
        return image

    async def push_manifest(self, name: str, tag: str, doc: dict[str, Any], blobs: list[bytes]) -> str:
        """Push ``doc``; the digest the registry holds. skopeo keeps an image manifest's bytes
        (checked) but rewrites an index (it drops ``artifactType``)."""
        self.pushes += 1
        layout = OciLayout(self.tmp / f"crafted-{self.pushes}")
        for blob in blobs:
            layout.write_blob(blob, "application/octet-stream")
        descriptor, _ = layout.write_json(doc, doc["mediaType"])
        layout.tag(descriptor, tag)
        await self.registry.apush(layout.root, tag, f"{self.repo}/single/{name}:{tag}")
        digest: str = await self.status(name, tag, "HEAD", direct=True)
        assert doc["mediaType"] == OCI_INDEX or digest == descriptor.digest, "the registry holds the crafted bytes"
        return digest

    async def status(
        self, name: str, reference: str, method: str = "GET", *, direct: bool = False, spelling: str = "default"
    ) -> Any:
        """The mirror's status for a manifest (or, ``direct``, the registry's digest), with the
        repository named as the default upstream's, by path prefix or by ``ns``."""
        base = self.registry.url if direct else self.mirror
        headers = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
        path = f"{self.repo}/single/{name}/manifests/{reference}"
        url = {
            "default": f"{base}/v2/{path}",
            "prefix": f"{base}/v2/docker.io/{path}",
            "ns": f"{base}/v2/{path}?ns=docker.io",
        }[spelling]
        async with self.session.request(method, url, headers=headers) as response:
            await response.read()
            return response.headers.get("Docker-Content-Digest") if direct else response.status


@pytest.fixture
async def world(
    registry: Registry, aiohttp_server: ServerFactory, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> Any:
    keys = {name: generate_key() for name in ("release", "ci", "other")}
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache", tag_ttl=0.0, negative_ttl=0.0),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        mirror=MirrorConfig(enforce_policies=True),
        policies=policies(tmp_path / "policies", repo, keys, Rekor()),
    )
    server = await aiohttp_server(create_app(config))
    async with aiohttp.ClientSession() as session:
        yield World(registry, f"http://{server.host}:{server.port}", repo, keys, tmp_path, image_factory, session)


def sig_tag(digest: str, suffix: str = ".sig") -> str:
    return digest.replace(":", "-") + suffix


def relabelled(image: ImageInfo, layer_type: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The image's manifest with every layer's media type replaced (its bytes stay a tar)."""
    doc: dict[str, Any] = json.loads(image.manifest_bytes)
    for layer in doc["layers"]:
        layer["mediaType"] = layer_type
    if config is not None:
        doc["config"] = config
        doc["artifactType"] = layer_type
    return doc


def blobs_of(image: ImageInfo) -> list[bytes]:
    root = Path(image.layout) / "blobs" / "sha256"
    return [(root / d.partition(":")[2]).read_bytes() for d in image.blob_digests]


async def test_unsigned_image_is_refused_whatever_it_claims(world: World) -> None:
    # The plain unsigned image: the baseline.
    await world.push_image("plain", "1")
    assert await world.status("plain", "1") == 403
    # Annotations naming the bundle media type, on the manifest and as artifactType.
    annotated = await world.push_image("annotated", "1", annotations=BUNDLE_NOTE)
    disguised = json.loads(annotated.manifest_bytes) | {"artifactType": SIGSTORE_BUNDLE}
    typed = await world.push_manifest("annotated", "typed", disguised, blobs_of(annotated))
    for reference in ("1", annotated.manifest_digest, "typed", typed):
        for method in ("GET", "HEAD"):
            assert await world.status("annotated", reference, method) == 403, (reference, method)


@pytest.mark.parametrize("spelling", ["default", "prefix", "ns"])
async def test_disguises_are_refused_under_every_repository_spelling(world: World, spelling: str) -> None:
    signed = await world.push_image("target", "1")
    tag = sig_tag(signed.manifest_digest)
    disguised = await world.push_image("target", tag, annotations=BUNDLE_NOTE)
    for reference in (tag, disguised.manifest_digest):
        for method in ("GET", "HEAD"):
            assert await world.status("target", reference, method, spelling=spelling) == 403, (reference, method)


@pytest.mark.parametrize(
    ("suffix", "signed_after"),
    [
        ("", 200),
        (".sig", 403),  # the disguise took the real signature's tag: the signed image lost it
        (".att", 200),
        (".sbom", 200),
    ],
)
async def test_signature_shaped_tags_do_not_exempt(world: World, suffix: str, signed_after: int) -> None:
    signed = await world.push_image("target", "1")
    await push_legacy_signature(world, "target", signed.manifest_digest)
    tag = sig_tag(signed.manifest_digest, suffix)
    unsigned = await world.push_image("target", tag)
    for reference in (tag, unsigned.manifest_digest):
        for method in ("GET", "HEAD"):
            assert await world.status("target", reference, method) == 403, (reference, method)
    assert await world.status("target", "1") == signed_after


@pytest.mark.parametrize(
    ("case", "layer_type", "config"),
    [
        # containers/image unpacks these tars whatever the label: CRI-O would run them.
        ("tar-as-simplesigning", SIMPLESIGNING, None),
        ("tar-as-bundle-empty-config", SIGSTORE_BUNDLE, "empty"),
        ("tar-as-dsse", "application/vnd.dsse.envelope.v1+json", None),
    ],
)
async def test_filesystem_under_signature_media_types_is_refused(
    world: World, case: str, layer_type: str, config: str | None
) -> None:
    image = world.factory.image("x", layers=[{"bin/hello": b"#!/bin/sh\necho unsigned code\n"}], cmd=["/bin/hello"])
    blobs = blobs_of(image)
    empty = {"mediaType": OCI_EMPTY, "digest": "sha256:" + _sha256(b"{}"), "size": 2}
    doc = relabelled(image, layer_type, empty if config == "empty" else None)
    digest = await world.push_manifest(case, "1", doc, [*blobs, b"{}"])
    for reference in ("1", digest):
        assert await world.status(case, reference) == 403, reference


async def test_mixed_layers_are_an_image(world: World) -> None:
    image = world.factory.image("x", layers=[2_000])
    doc: dict[str, Any] = json.loads(image.manifest_bytes)
    payload = b'{"critical":{"type":"cosign container image signature"}}'
    doc["layers"].append({"mediaType": SIMPLESIGNING, "digest": "sha256:" + _sha256(payload), "size": len(payload)})
    await world.push_manifest("mixed", "1", doc, [*blobs_of(image), payload])
    assert await world.status("mixed", "1") == 403


async def test_index_of_fake_signatures_serves_nothing_runnable(world: World, containerd: Containerd) -> None:
    """An index of platform-less entries claiming to be bundles is a signature list (an index
    runs nothing): the runnable image it really lists is refused when fetched, so
    containerd's pull of the list fails too."""
    image = await world.push_image("fake-list", "inner")
    entry = image.descriptor().to_json() | {"artifactType": SIGSTORE_BUNDLE}
    entry.pop("platform", None)
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    await world.push_manifest("fake-list", "1", doc, [*blobs_of(image), image.manifest_bytes])
    assert await world.status("fake-list", "1") == 200
    assert await world.status("fake-list", image.manifest_digest) == 403
    with pytest.raises(CommandError):
        await containerd.apull(
            world.ref("fake-list") + ":1", world.mirror, namespace=containerd.new_namespace(), timeout=30
        )


async def test_disguised_image_does_not_pull_through_containerd(world: World, containerd: Containerd) -> None:
    signed = await world.push_image("target", "1")
    tag = sig_tag(signed.manifest_digest)
    await world.push_image("target", tag, annotations=BUNDLE_NOTE)
    with pytest.raises(CommandError):
        await containerd.apull(
            f"{world.ref('target')}:{tag}", world.mirror, namespace=containerd.new_namespace(), timeout=30
        )


async def test_real_signature_objects_are_still_served(world: World) -> None:
    image = await world.push_image("signed", "1")
    legacy = await push_legacy_signature(world, "signed", image.manifest_digest)
    assert await world.status("signed", "1") == 200
    for reference in (sig_tag(image.manifest_digest), legacy):
        for method in ("GET", "HEAD"):
            assert await world.status("signed", reference, method) == 200, (reference, method)
    # Not because of its tag: the same signature under a plain tag is served too.
    artifact = sign_legacy(image.manifest_digest, world.ref("signed"), [world.keys["ci"]])
    artifact.tags["copy"] = artifact.tags.pop(artifact.tag)
    layout = write_oci_layout(world.tmp / "sig-copy", artifact)
    await world.registry.apush(layout, "copy", f"{world.repo}/single/signed:copy")
    assert await world.status("signed", "copy") == 200
    # The bundle format: the referrers fallback index and the bundle artifact it lists.
    bundle = sign_bundle(image.manifest_digest, world.ref("signed"), [world.keys["ci"]])
    layout = write_oci_layout(world.tmp / "bundle", bundle)
    await world.registry.apush(layout, bundle.tag, f"{world.repo}/single/signed:{bundle.tag}")
    assert await world.status("signed", bundle.tag) == 200
    async with world.session.get(f"{world.mirror}/v2/{world.repo}/single/signed/manifests/{bundle.tag}") as response:
        entries = (await response.json())["manifests"]
    assert entries
    for entry in entries:
        assert await world.status("signed", entry["digest"]) == 200


async def push_legacy_signature(world: World, name: str, digest: str) -> str:
    artifact = sign_legacy(digest, world.ref(name), [world.keys["ci"]])
    layout = write_oci_layout(world.tmp / f"sig-{name}-{digest[-8:]}", artifact)
    await world.registry.apush(layout, artifact.tag, f"{world.repo}/single/{name}:{artifact.tag}")
    return artifact.tags[artifact.tag]


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
