"""What a manifest is (``proxy.oci.artifacts``): signature artifacts by structure and content,
never by tag or annotation (issue 13 finding 4). Table-driven over the shapes cosign
writes and the disguises an attacker tries; the same attacks against a real registry
through the mirror are in ``test_pulltime_exemptions.py``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.oci.artifacts import (
    DSSE_ENVELOPE,
    SIGSTORE_BUNDLE,
    SIMPLESIGNING,
    Kind,
    classify,
    is_signature_object,
    payload_matches,
)
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import DOCKER_LIST, DOCKER_MANIFEST, OCI_EMPTY, OCI_INDEX, OCI_MANIFEST

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def desc(media_type: str, seed: str = "x", size: int = 100, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(seed.encode())), "size": size, **extra}


def manifest(config: str, *layers: str, media_type: str = OCI_MANIFEST, **extra: Any) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": media_type, "config": desc(config, "config"), **extra}
    doc["layers"] = [desc(t, f"layer{i}") for i, t in enumerate(layers)]
    return json.dumps(doc).encode()


def index(*entries: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries), **extra}).encode()


BUNDLE_NOTE: dict[str, Any] = {"annotations": {"note": f"signed: {SIGSTORE_BUNDLE}", SIGSTORE_BUNDLE: "yes"}}


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        # What cosign writes.
        (manifest(OCI_CONFIG, SIMPLESIGNING), Kind.SIGNATURE),  # legacy .sig
        (manifest(OCI_CONFIG, SIMPLESIGNING, SIMPLESIGNING), Kind.SIGNATURE),  # two signers
        (manifest(DOCKER_CONFIG, SIMPLESIGNING, media_type=DOCKER_MANIFEST), Kind.SIGNATURE),
        (manifest(OCI_CONFIG, DSSE_ENVELOPE), Kind.SIGNATURE),  # legacy .att
        (manifest(OCI_EMPTY, SIGSTORE_BUNDLE, artifactType=SIGSTORE_BUNDLE), Kind.SIGNATURE),  # v3 bundle
        (manifest("application/vnd.dev.cosign.artifact.sig.v1+json", SIMPLESIGNING), Kind.SIGNATURE),
        (index(desc(OCI_MANIFEST, artifactType=SIGSTORE_BUNDLE)), Kind.SIGNATURE_LIST),  # referrers fallback
        (index(), Kind.SIGNATURE_LIST),  # no referrers yet
        # Disguises: an image stays an image.
        (manifest(OCI_CONFIG, TAR_GZ), Kind.IMAGE),
        (manifest(OCI_CONFIG, TAR_GZ, **BUNDLE_NOTE), Kind.IMAGE),  # the annotation attack
        (manifest(OCI_CONFIG, TAR_GZ, artifactType=SIGSTORE_BUNDLE), Kind.IMAGE),
        (manifest(OCI_EMPTY, TAR_GZ, artifactType=SIGSTORE_BUNDLE), Kind.IMAGE),
        (manifest(OCI_CONFIG, SIMPLESIGNING, TAR_GZ), Kind.IMAGE),  # one filesystem layer is enough
        (manifest(OCI_CONFIG, TAR_GZ, SIMPLESIGNING), Kind.IMAGE),
        (manifest(DOCKER_CONFIG, DOCKER_LAYER, media_type=DOCKER_MANIFEST, **BUNDLE_NOTE), Kind.IMAGE),
        (manifest(OCI_CONFIG), Kind.IMAGE),  # no layer at all: not a signature either
        (manifest("application/vnd.wasm.config.v0+json", SIMPLESIGNING), Kind.IMAGE),  # runwasi's config
        (manifest(OCI_CONFIG, "application/vnd.dev.cosign.simplesigning.v1+json+gzip"), Kind.IMAGE),
        (manifest(OCI_CONFIG, "application/vnd.dev.cosign.anything"), Kind.IMAGE),  # prefixes do not count
        (manifest(OCI_CONFIG, "APPLICATION/VND.DEV.COSIGN.SIMPLESIGNING.V1+JSON"), Kind.IMAGE),
        (manifest(OCI_CONFIG, *[SIMPLESIGNING] * 65), Kind.IMAGE),  # more than any signing writes
        (index(desc(OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"})), Kind.IMAGE),
        (index(desc(OCI_MANIFEST, platform={"os": "linux"}, artifactType=SIGSTORE_BUNDLE)), Kind.IMAGE),
        # skopeo drops artifactType when it copies an index: the list is judged by its shape, and
        # each entry a runtime fetches by digest is judged on its own.
        (index(desc(OCI_MANIFEST, artifactType=SIGSTORE_BUNDLE), desc(OCI_MANIFEST)), Kind.SIGNATURE_LIST),
        (index(desc(OCI_MANIFEST), desc(OCI_MANIFEST, platform={"os": "linux"})), Kind.IMAGE),
        (index(desc(OCI_INDEX, artifactType=SIGSTORE_BUNDLE)), Kind.IMAGE),  # nested index
        (json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []}).encode(), Kind.IMAGE),
        (b"not json " + SIGSTORE_BUNDLE.encode(), Kind.IMAGE),
        (b"[" * 5000 + b"]" * 5000, Kind.IMAGE),
    ],
)
def test_kinds(data: bytes, kind: Kind) -> None:
    assert classify(data, None).kind is kind
    assert is_signature_object(data, None) is (kind is not Kind.IMAGE)


def test_signature_layers_are_listed_for_inspection() -> None:
    artifact = classify(manifest(OCI_EMPTY, SIGSTORE_BUNDLE, SIGSTORE_BUNDLE), None)
    assert [d.media_type for d in artifact.inspect] == [SIGSTORE_BUNDLE] * 2
    oversized = json.loads(manifest(OCI_CONFIG, SIMPLESIGNING))
    oversized["layers"][0]["size"] = (4 << 20) + 1
    assert classify(json.dumps(oversized).encode(), None).kind is Kind.IMAGE


SIMPLE_PAYLOAD = b'{"critical":{"identity":{},"image":{},"type":"cosign container image signature"}}'


@pytest.mark.parametrize(
    ("media_type", "data", "matches"),
    [
        (SIMPLESIGNING, SIMPLE_PAYLOAD, True),
        (SIGSTORE_BUNDLE, json.dumps({"mediaType": SIGSTORE_BUNDLE, "dsseEnvelope": {}}).encode(), True),
        (DSSE_ENVELOPE, b'{"payloadType":"application/vnd.in-toto+json","payload":"e30=","signatures":[]}', True),
        (SIMPLESIGNING, b"\x1f\x8b\x08\x00" + b"\x00" * 20, False),  # gzip
        (SIMPLESIGNING, b"bin/hello" + b"\x00" * 503 + b"\x7fELF\x02\x01\x01", False),  # tar with a binary
        (SIMPLESIGNING, b"(\xb5/\xfd" + b"\x00" * 10, False),  # zstd
        (SIMPLESIGNING, b'{"other": 1}', False),  # JSON, but not the document the type names
        (SIMPLESIGNING, b"[]", False),
        (SIGSTORE_BUNDLE, SIMPLE_PAYLOAD, False),
        ("application/octet-stream", SIMPLE_PAYLOAD, False),
        (SIMPLESIGNING, b"[" * 100_000, False),  # nesting bomb
        (SIMPLESIGNING, b"\xff\xfe{}", False),
    ],
)
def test_payload_matches(media_type: str, data: bytes, matches: bool) -> None:
    assert payload_matches(media_type, data) is matches


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.binary(max_size=300), st.binary(max_size=300)).map(lambda p: p[0] + b"\x00" + p[1]))
def test_bytes_with_a_nul_never_pass_as_a_signature_document(data: bytes) -> None:
    """An executable (ELF, PE, Mach-O) always holds NUL bytes; JSON text never does."""
    assert not payload_matches(SIMPLESIGNING, b'{"critical":' + data + b"}")
    assert not payload_matches(SIMPLESIGNING, data)
