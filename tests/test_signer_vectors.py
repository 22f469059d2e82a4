"""The verifier against signatures written by real tools (tests/data/cosign/, see its
README and each folder's PROVENANCE.txt), and tests/signer.py against their shapes: what
our signer writes must look like what cosign writes, or the other tests prove little."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.oci.digest import Digest
from proxy.trust.cosign import REKOR_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE, Reason
from proxy.trust.keys import load_public_key
from proxy.trust.verification import SignaturePolicy, verify_image
from tests.signer import (
    MemoryRegistry,
    Rekor,
    SimpleSigningLayer,
    generate_key,
    legacy_artifact,
    sign_bundle,
    sign_legacy,
    simple_signing_payload,
    write_oci_layout,
)
from tests.support import skopeo
from tests.support.registry import Registry

VECTORS = Path(__file__).parent / "data" / "cosign"
REKOR_PUB = (VECTORS / "rekor-public-good" / "rekor.pub").read_bytes()
FOLDERS = sorted(p.name for p in VECTORS.iterdir() if (p / "payload.json").exists())
LOGGED = ["containers-image-cosign-key-rekor-valid", "containers-image-fulcio-rekor-valid"]
REPO = "vectors/app"


def _annotations(folder: Path) -> dict[str, str]:
    path = folder / "annotations.json"
    if path.exists():
        annotations: dict[str, str] = json.loads(path.read_text())
        return annotations
    return {"dev.cosignproject.cosign/signature": (folder / "signature.b64").read_text().strip()}


def _image_digest(folder: Path) -> Digest:
    """The signed image: from its manifest when the vector has one, else as the payload says."""
    named = json.loads((folder / "payload.json").read_bytes())["critical"]["image"]
    manifest = folder / "image-manifest.json"
    if manifest.exists():
        assert str(Digest.of(manifest.read_bytes())) == named["docker-manifest-digest"]
        return Digest.of(manifest.read_bytes())
    return Digest.parse(named["docker-manifest-digest"])


def _registry_with_vector(folder: Path) -> tuple[MemoryRegistry, Digest]:
    """The vector's payload and annotations as the layer of a ``.sig`` manifest."""
    digest = _image_digest(folder)
    annotations = _annotations(folder)
    layer = SimpleSigningLayer(
        (folder / "payload.json").read_bytes(),
        base64.b64decode("".join(annotations["dev.cosignproject.cosign/signature"].split())),
        annotations.get(REKOR_ANNOTATION),
    )
    source = MemoryRegistry()
    source.push(REPO, legacy_artifact(str(digest), [layer]))
    return source, digest


@pytest.mark.parametrize("name", FOLDERS)
async def test_real_vector_verifies_with_its_key(name: str) -> None:
    source, digest = _registry_with_vector(VECTORS / name)
    policy = SignaturePolicy.from_pem({"vector": (VECTORS / name / "cosign.pub").read_bytes()})
    result = await verify_image(source, REPO, [digest], policy)
    expected = Reason.BAD_SIGNATURE if name.endswith("-NEG") else None
    assert result.keys[0].reason is expected, result
    assert result.allowed is (expected is None)


@pytest.mark.parametrize(
    ("name", "log_key", "expected"),
    [pytest.param(n, REKOR_PUB, None, id=f"{n}-rekor") for n in LOGGED]
    + [pytest.param(n, "rogue", Reason.UNTRUSTED_LOG, id=f"{n}-rogue-log") for n in LOGGED]
    + [pytest.param("containers-image-cosign-valid", REKOR_PUB, Reason.NOT_IN_TLOG, id="unlogged-vector")],
)
async def test_real_rekor_set(name: str, log_key: bytes | str, expected: Reason | None) -> None:
    source, digest = _registry_with_vector(VECTORS / name)
    log = Rekor().public_pem if log_key == "rogue" else log_key
    policy = SignaturePolicy.from_pem({"vector": (VECTORS / name / "cosign.pub").read_bytes()}, log_key=log)
    result = await verify_image(source, REPO, [digest], policy)
    assert result.keys[0].reason is expected, result


def test_rekor_key_is_the_log_the_vectors_name() -> None:
    log_id = load_public_key(REKOR_PUB).key_id
    for name in LOGGED:
        bundle = json.loads(_annotations(VECTORS / name)[REKOR_ANNOTATION])
        assert bundle["Payload"]["logID"] == log_id


# --- the signer writes what cosign writes -----------------------------------------------
def _shape(value: Any) -> Any:
    """Keys and value types, recursively: the structure without the contents."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


@pytest.mark.parametrize("name", FOLDERS)
def test_signer_payload_is_byte_identical(name: str) -> None:
    real = (VECTORS / name / "payload.json").read_bytes()
    critical = json.loads(real)["critical"]
    ours = simple_signing_payload(
        critical["image"]["docker-manifest-digest"],
        critical["identity"]["docker-reference"],
        json.loads(real)["optional"],
    )
    assert ours == real


def _our_layer(rekor: Rekor | None) -> dict[str, Any]:
    key = generate_key()
    artifact = sign_legacy(str(Digest.of(b"img")), "registry.example/app", [key], rekor)
    manifest_bytes, _ = artifact.manifests[artifact.tags[artifact.tag]]
    layer: dict[str, Any] = json.loads(manifest_bytes)["layers"][0]
    return layer


@pytest.mark.parametrize(
    ("name", "logged"),
    [("containers-image-cosign-valid", False), ("containers-image-cosign-key-rekor-valid", True)],
)
def test_signer_layer_has_the_real_annotations(name: str, logged: bool) -> None:
    real = _annotations(VECTORS / name)
    ours = _our_layer(Rekor() if logged else None)
    assert set(ours["annotations"]) == set(real)
    orig = next((VECTORS / name).glob("ORIG_*")).read_bytes()
    assert ours["mediaType"] == json.loads(orig.split(b"\n", 1)[1])["mimeType"]
    assert ours["mediaType"] == SIMPLESIGNING_MEDIA_TYPE
    if logged:
        real_set, our_set = json.loads(real[REKOR_ANNOTATION]), json.loads(ours["annotations"][REKOR_ANNOTATION])
        assert _shape(our_set) == _shape(real_set)
        assert list(our_set["Payload"]) == list(real_set["Payload"])  # field order too
        real_body = json.loads(base64.b64decode(real_set["Payload"]["body"]))
        our_body = json.loads(base64.b64decode(our_set["Payload"]["body"]))
        assert _shape(our_body) == _shape(real_body)


# --- through a real registry: skopeo pushes the signer's OCI layouts --------------------
_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


class HttpSource:
    """A minimal SignatureSource over the registry API (the mirror's will use its cache)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def _get(self, path: str) -> tuple[bytes, str] | None:
        async with self.session.get(f"{self.base}/v2/{path}", headers={"Accept": _ACCEPT}) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.read(), response.content_type

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        return await self._get(f"{repository}/manifests/{reference}")

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None:
        got = await self._get(f"{repository}/blobs/{digest}")
        return None if got is None else got[0]

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        got = await self._get(f"{repository}/referrers/{digest}")  # Distribution 2.8: 404
        return None if got is None else dict(json.loads(got[0]))


@pytest.mark.parametrize("fmt", ["legacy", "bundle"])
async def test_signer_layout_pushed_with_skopeo_verifies(
    registry: Registry, repo: str, tmp_path: Path, fmt: str
) -> None:
    key, rekor = generate_key(), Rekor()
    digest = Digest.of(b"an image pushed elsewhere")
    sign = sign_legacy if fmt == "legacy" else sign_bundle
    artifact = sign(str(digest), f"{registry.host}/{repo}", [key], rekor)
    layout = write_oci_layout(tmp_path / "layout", artifact)
    skopeo.copy(f"oci:{layout}:{artifact.tag}", registry.ref(f"{repo}:{artifact.tag}"))
    policy = SignaturePolicy.from_pem({"k": key.public_pem}, log_key=rekor.public_pem)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        result = await verify_image(HttpSource(session, registry.url), repo, [digest], policy)
    assert result.allowed, result
