"""Cosign verification (proxy.trust.keys, proxy.trust.rekor, proxy.trust.cosign, proxy.trust.verification) against
signatures written by tests/signer.py, through an in-memory SignatureSource."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.errors import ConfigError, KeyUnsupported, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.trust.cosign import Reason, pae
from proxy.trust.keys import load_public_key
from proxy.trust.verification import SignaturePolicy, VerificationResult, verify_image
from tests.signer import (
    OCI_INDEX,
    Artifact,
    MemoryRegistry,
    Rekor,
    SigningKey,
    bundle_artifact,
    cosign_statement,
    dsse_bundle,
    generate_key,
    legacy_artifact,
    sign_bundle,
    sign_legacy,
    sign_payload,
    simple_signing_payload,
    unsupported_public_pem,
)

REPO = "library/app"
REF = "registry.example/library/app"
IMAGE = str(Digest.of(b"the image manifest"))
OTHER = str(Digest.of(b"another image manifest"))
INDEX = str(Digest.of(b"a multi-arch index"))


@dataclass(frozen=True)
class World:
    keys: dict[str, SigningKey]
    rekor: Rekor
    rogue_rekor: Rekor

    def policy(self, *names: str, threshold: int = 1, log: Rekor | None = None) -> SignaturePolicy:
        keys = {name: self.keys[name].public_pem for name in names}
        return SignaturePolicy.from_pem(
            keys, threshold=threshold, log_key=log.public_pem if log else None
        )


@pytest.fixture(scope="module")
def world() -> World:
    keys = {
        "alice": generate_key("ecdsa-p256"),
        "bob": generate_key("ecdsa-p256"),
        "p384": generate_key("ecdsa-p384"),
        "rsa-pkcs1": generate_key("rsa-pkcs1"),
        "rsa-pss": generate_key("rsa-pss"),
        "ed25519": generate_key("ed25519"),
    }
    return World(keys, Rekor(), Rekor())


Setup = tuple[MemoryRegistry, list[str], SignaturePolicy]


def registry(*artifacts: Artifact, referrers_api: bool = True) -> MemoryRegistry:
    source = MemoryRegistry(referrers_api=referrers_api)
    for artifact in artifacts:
        source.push(REPO, artifact)
    return source


def _legacy(w: World, *names: str, rekor: Rekor | None = None) -> Artifact:
    return sign_legacy(IMAGE, REF, [w.keys[n] for n in names], rekor)


def _bundle(w: World, *names: str, rekor: Rekor | None = None) -> Artifact:
    return sign_bundle(IMAGE, REF, [w.keys[n] for n in names], rekor)


def _tampered(w: World, field: str) -> Artifact:
    layer = sign_payload(w.keys["alice"], simple_signing_payload(IMAGE, REF))
    if field == "payload":
        tampered = layer.payload.replace(REF.encode(), b"evil.example/app")
        assert tampered != layer.payload
        layer = dataclasses.replace(layer, payload=tampered)
    else:
        # Flip the last byte: setting it to a fixed value left the signature unchanged
        # whenever it already held that value (1 run in 256 "verified a tampered signature").
        tampered = layer.signature[:-1] + bytes([layer.signature[-1] ^ 0xFF])
        assert tampered != layer.signature
        layer = dataclasses.replace(layer, signature=tampered)
    return legacy_artifact(IMAGE, [layer])


def _blob_missing(w: World, layer_digest_of: Callable[[Artifact], str]) -> MemoryRegistry:
    artifact = _legacy(w, "alice")
    source = registry(artifact)
    del source.blobs[(REPO, layer_digest_of(artifact))]
    return source


def _payload_digest(artifact: Artifact) -> str:
    return str(Digest.of(simple_signing_payload(IMAGE, REF)))


def _log_for_other_signature(w: World) -> Artifact:
    """A genuine SET, but for a different signature of the same payload."""
    payload = simple_signing_payload(IMAGE, REF)
    other = sign_payload(w.keys["alice"], payload, w.rekor)
    layer = sign_payload(w.keys["alice"], payload)
    return legacy_artifact(IMAGE, [dataclasses.replace(layer, rekor_bundle=other.rekor_bundle)])


def _statement_bundle(w: World, digest: str, predicate: str | None = None) -> Artifact:
    statement = cosign_statement(digest, REF, *([predicate] if predicate else []))
    return bundle_artifact(IMAGE, OCI_INDEX, 100, [dsse_bundle(w.keys["alice"], statement)])


def _tampered_bundle(w: World) -> Artifact:
    bundle = json.loads(dsse_bundle(w.keys["alice"], cosign_statement(IMAGE, REF)))
    statement = cosign_statement(IMAGE, "evil.example/app")
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(statement).decode()
    return bundle_artifact(IMAGE, OCI_INDEX, 100, [json.dumps(bundle).encode()])


def _mixed_failures(w: World) -> Artifact:
    """Two layers: one not by alice, one by alice for another image: the more telling wins."""
    wrong_key = sign_payload(w.keys["bob"], simple_signing_payload(IMAGE, REF))
    replayed = sign_payload(w.keys["alice"], simple_signing_payload(OTHER, REF))
    return legacy_artifact(IMAGE, [wrong_key, replayed])


def _untyped_index(w: World) -> Artifact:
    """The referrers-tag index as skopeo 1.9 rewrites it: entries without artifactType."""
    artifact = _bundle(w, "alice")
    index_digest = artifact.tags[artifact.tag]
    index = json.loads(artifact.manifests[index_digest][0])
    for entry in index["manifests"]:
        del entry["artifactType"]
    data = json.dumps(index).encode()
    manifests = {**artifact.manifests, str(Digest.of(data)): (data, OCI_INDEX)}
    return Artifact(manifests, {artifact.tag: str(Digest.of(data))}, artifact.blobs)


def _other_referrer() -> Artifact:
    """An SBOM-like artifact referring to the image: not a signature, silently ignored."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": str(Digest.of(b"{}"))},
        "layers": [],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "digest": IMAGE},
    }
    data = json.dumps(manifest).encode()
    return Artifact({str(Digest.of(data)): (data, str(manifest["mediaType"]))}, {}, {})


R = Reason
CASES: list[tuple[str, Callable[[World], Setup], bool, dict[str, Reason | None]]] = [
    # id, setup, allowed, per-key outcome (None: verified)
    ("right-key", lambda w: (registry(_legacy(w, "alice")), [IMAGE], w.policy("alice")),
     True, {"alice": None}),
    ("wrong-key", lambda w: (registry(_legacy(w, "bob")), [IMAGE], w.policy("alice")),
     False, {"alice": R.BAD_SIGNATURE}),
    ("threshold-2-one-signer",
     lambda w: (registry(_legacy(w, "alice")), [IMAGE], w.policy("alice", "bob", threshold=2)),
     False, {"alice": None, "bob": R.BAD_SIGNATURE}),
    ("threshold-2-both-signers",
     lambda w: (registry(_legacy(w, "alice", "bob")), [IMAGE],
                w.policy("alice", "bob", threshold=2)),
     True, {"alice": None, "bob": None}),
    ("threshold-2-one-per-format",
     lambda w: (registry(_legacy(w, "alice"), _bundle(w, "bob")), [IMAGE],
                w.policy("alice", "bob", threshold=2)),
     True, {"alice": None, "bob": None}),
    ("threshold-1-of-2", lambda w: (registry(_legacy(w, "bob")), [IMAGE], w.policy("alice", "bob")),
     True, {"alice": R.BAD_SIGNATURE, "bob": None}),
    ("replayed-payload",
     lambda w: (registry(legacy_artifact(IMAGE, [sign_payload(
         w.keys["alice"], simple_signing_payload(OTHER, REF))])), [IMAGE], w.policy("alice")),
     False, {"alice": R.DIGEST_MISMATCH}),
    ("tampered-payload", lambda w: (registry(_tampered(w, "payload")), [IMAGE], w.policy("alice")),
     False, {"alice": R.BAD_SIGNATURE}),
    ("tampered-signature",
     lambda w: (registry(_tampered(w, "signature")), [IMAGE], w.policy("alice")),
     False, {"alice": R.BAD_SIGNATURE}),
    ("no-signature-manifest", lambda w: (registry(), [IMAGE], w.policy("alice")),
     False, {"alice": R.NO_SIGNATURE}),
    ("signed-other-image-only",
     lambda w: (registry(sign_legacy(OTHER, REF, [w.keys["alice"]])), [IMAGE], w.policy("alice")),
     False, {"alice": R.NO_SIGNATURE}),
    ("multi-arch-signed-at-index",
     lambda w: (registry(sign_legacy(INDEX, REF, [w.keys["alice"]])), [IMAGE, INDEX],
                w.policy("alice")),
     True, {"alice": None}),
    ("multi-arch-index-not-passed",
     lambda w: (registry(sign_legacy(INDEX, REF, [w.keys["alice"]])), [IMAGE], w.policy("alice")),
     False, {"alice": R.NO_SIGNATURE}),
    ("multi-arch-bundle-at-index",
     lambda w: (registry(sign_bundle(INDEX, REF, [w.keys["alice"]])), [IMAGE, INDEX],
                w.policy("alice")),
     True, {"alice": None}),
    ("layer-blob-missing",
     lambda w: (_blob_missing(w, _payload_digest), [IMAGE], w.policy("alice")),
     False, {"alice": R.NO_SIGNATURE}),
    ("most-telling-failure-wins", lambda w: (registry(_mixed_failures(w)), [IMAGE], w.policy("alice")),
     False, {"alice": R.DIGEST_MISMATCH}),
    # transparency log, legacy annotation
    ("tlog-required-absent",
     lambda w: (registry(_legacy(w, "alice")), [IMAGE], w.policy("alice", log=w.rekor)),
     False, {"alice": R.NOT_IN_TLOG}),
    ("tlog-present",
     lambda w: (registry(_legacy(w, "alice", rekor=w.rekor)), [IMAGE],
                w.policy("alice", log=w.rekor)),
     True, {"alice": None}),
    ("tlog-not-required-present",
     lambda w: (registry(_legacy(w, "alice", rekor=w.rogue_rekor)), [IMAGE], w.policy("alice")),
     True, {"alice": None}),
    ("tlog-wrong-rekor-key",
     lambda w: (registry(_legacy(w, "alice", rekor=w.rogue_rekor)), [IMAGE],
                w.policy("alice", log=w.rekor)),
     False, {"alice": R.UNTRUSTED_LOG}),
    ("tlog-entry-for-other-signature",
     lambda w: (registry(_log_for_other_signature(w)), [IMAGE], w.policy("alice", log=w.rekor)),
     False, {"alice": R.LOG_ENTRY_MISMATCH}),
    # Sigstore bundle format
    ("bundle-referrers-api", lambda w: (registry(_bundle(w, "alice")), [IMAGE], w.policy("alice")),
     True, {"alice": None}),
    ("bundle-referrers-tag-fallback",
     lambda w: (registry(_bundle(w, "alice"), referrers_api=False), [IMAGE], w.policy("alice")),
     True, {"alice": None}),
    ("bundle-untyped-index-entry",
     lambda w: (registry(_untyped_index(w), referrers_api=False), [IMAGE], w.policy("alice")),
     True, {"alice": None}),
    ("other-referrers-ignored",
     lambda w: (registry(_other_referrer(), _legacy(w, "alice")), [IMAGE], w.policy("alice")),
     True, {"alice": None}),
    ("bundle-wrong-key", lambda w: (registry(_bundle(w, "bob")), [IMAGE], w.policy("alice")),
     False, {"alice": R.BAD_SIGNATURE}),
    ("bundle-replayed-statement",
     lambda w: (registry(_statement_bundle(w, OTHER)), [IMAGE], w.policy("alice")),
     False, {"alice": R.DIGEST_MISMATCH}),
    ("bundle-tampered-statement",
     lambda w: (registry(_tampered_bundle(w)), [IMAGE], w.policy("alice")),
     False, {"alice": R.BAD_SIGNATURE}),
    ("bundle-attestation-is-not-a-signature",
     lambda w: (registry(_statement_bundle(w, IMAGE, "https://slsa.dev/provenance/v1")), [IMAGE],
                w.policy("alice")),
     False, {"alice": R.WRONG_PREDICATE}),
    ("bundle-tlog-required-absent",
     lambda w: (registry(_bundle(w, "alice")), [IMAGE], w.policy("alice", log=w.rekor)),
     False, {"alice": R.NOT_IN_TLOG}),
    ("bundle-tlog-present",
     lambda w: (registry(_bundle(w, "alice", rekor=w.rekor)), [IMAGE],
                w.policy("alice", log=w.rekor)),
     True, {"alice": None}),
    ("bundle-tlog-wrong-rekor-key",
     lambda w: (registry(_bundle(w, "alice", rekor=w.rogue_rekor)), [IMAGE],
                w.policy("alice", log=w.rekor)),
     False, {"alice": R.UNTRUSTED_LOG}),
]


def _signed_with(signer: str, kind: str, fmt: Callable[..., Artifact]) -> Callable[[World], Setup]:
    return lambda w: (registry(fmt(w, signer)), [IMAGE], w.policy(kind))


# Every key type, both formats.
for _kind in ("p384", "rsa-pkcs1", "rsa-pss", "ed25519"):
    CASES += [
        (f"{_kind}-legacy", _signed_with(_kind, _kind, _legacy), True, {_kind: None}),
        (f"{_kind}-bundle", _signed_with(_kind, _kind, _bundle), True, {_kind: None}),
        (f"{_kind}-wrong-key", _signed_with("alice", _kind, _legacy), False, {_kind: R.BAD_SIGNATURE}),
    ]


@pytest.mark.parametrize(
    ("setup", "allowed", "outcomes"),
    [pytest.param(s, a, o, id=i) for i, s, a, o in CASES],
)
async def test_verify_image(
    world: World,
    setup: Callable[[World], Setup],
    allowed: bool,
    outcomes: dict[str, Reason | None],
) -> None:
    source, digests, policy = setup(world)
    result = await verify_image(source, REPO, [Digest.parse(d) for d in digests], policy)
    assert {k.name: k.reason for k in result.keys} == outcomes, result
    assert result.allowed is allowed


async def test_missing_blob_is_named_in_notes(world: World) -> None:
    source = _blob_missing(world, _payload_digest)
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], world.policy("alice"))
    assert result.notes and "not found" in result.notes[0]
    assert result.keys[0].detail == result.notes[0]


async def test_deny_message_lists_each_failing_key(world: World) -> None:
    source = registry(_legacy(world, "alice"))
    policy = world.policy("alice", "bob", threshold=2)
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], policy)
    assert result.message() == (
        "1 of 2 required signatures verified; bob: signature does not verify"
    )
    assert result.verified_keys == ("alice",)


@pytest.mark.parametrize(
    ("manifest", "blob", "expected"),
    [
        pytest.param(b"not json", None, Reason.NO_SIGNATURE, id="sig-manifest-not-json"),
        pytest.param(b'{"layers": 3}', None, Reason.NO_SIGNATURE, id="sig-manifest-no-layers"),
        pytest.param(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
            None, Reason.NO_SIGNATURE, id="sig-tag-is-an-index",
        ),
    ],
)
async def test_malformed_signature_objects_are_skipped(
    world: World, manifest: bytes, blob: bytes | None, expected: Reason
) -> None:
    source = MemoryRegistry()
    source.manifests[(REPO, f"sha256-{Digest.parse(IMAGE).hex}.sig")] = (manifest, "x")
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], world.policy("alice"))
    assert result.keys[0].reason is expected
    assert result.notes


class GatedRegistry(MemoryRegistry):
    """Answers a manifest or referrers request only once both kinds are in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.manifest_asked = asyncio.Event()
        self.referrers_asked = asyncio.Event()

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        self.manifest_asked.set()
        await asyncio.wait_for(self.referrers_asked.wait(), 2)
        return await super().get_manifest(repository, reference)

    async def get_referrers(
        self, repository: str, digest: Digest, artifact_type: str | None
    ) -> dict[str, Any] | None:
        self.referrers_asked.set()
        await asyncio.wait_for(self.manifest_asked.wait(), 2)
        return await super().get_referrers(repository, digest, artifact_type)


async def test_formats_are_fetched_concurrently(world: World) -> None:
    source = GatedRegistry()
    source.push(REPO, _legacy(world, "alice"))
    source.push(REPO, _bundle(world, "bob"))
    policy = world.policy("alice", "bob", threshold=2)
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], policy)
    assert result.allowed


class BrokenRegistry(MemoryRegistry):
    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        raise UpstreamUnavailable("upstream down")


async def test_source_errors_propagate(world: World) -> None:
    with pytest.raises(UpstreamUnavailable):
        await verify_image(BrokenRegistry(), REPO, [Digest.parse(IMAGE)], world.policy("alice"))


# --- keys and policy ---------------------------------------------------------------------
def _private_pem() -> bytes:
    return generate_key().private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("pem", "algorithm", "error"),
    [
        pytest.param(lambda: generate_key("ecdsa-p256").public_pem, "ecdsa-p256-sha256", None,
                     id="p256"),
        pytest.param(lambda: generate_key("ecdsa-p384").public_pem, "ecdsa-p384-sha384", None,
                     id="p384"),
        pytest.param(lambda: generate_key("rsa-pkcs1").public_pem, "rsa-2048-sha256", None,
                     id="rsa"),
        pytest.param(lambda: generate_key("ed25519").public_pem, "ed25519", None, id="ed25519"),
        pytest.param(lambda: unsupported_public_pem("dsa"), None, "unsupported key type",
                     id="dsa"),
        pytest.param(lambda: unsupported_public_pem("secp256k1"), None,
                     "unsupported elliptic curve secp256k1", id="secp256k1"),
        pytest.param(lambda: unsupported_public_pem("rsa-1024"), None, "RSA key of 1024 bits",
                     id="rsa-1024"),
        pytest.param(_private_pem, None, "not a PEM public key", id="private-key"),
        pytest.param(lambda: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                     None, "unreadable public key", id="garbage"),
    ],
)
def test_load_public_key(pem: Callable[[], bytes], algorithm: str | None, error: str | None) -> None:
    if error is None:
        assert load_public_key(pem(), name="k").algorithm == algorithm
        return
    with pytest.raises(KeyUnsupported, match=error) as caught:
        load_public_key(pem(), name="keys.prod")
    assert caught.value.message.startswith("keys.prod: ")


@pytest.mark.parametrize(
    ("names", "threshold", "error"),
    [
        pytest.param(("alice",), 1, None, id="one"),
        pytest.param(("alice", "bob"), 2, None, id="two-of-two"),
        pytest.param((), 1, "give keys or keyless identities", id="no-keys"),
        pytest.param(("alice",), 0, "threshold 0", id="zero"),
        pytest.param(("alice", "bob"), 3, "threshold 3", id="more-than-keys"),
        pytest.param(("alice", "alice-again"), 1, "are the same", id="duplicate-key"),
    ],
)
def test_policy_validation(
    world: World, names: tuple[str, ...], threshold: int, error: str | None
) -> None:
    keys = {n: world.keys[n.removesuffix("-again")].public_pem for n in names}
    if error is None:
        assert SignaturePolicy.from_pem(keys, threshold=threshold).threshold == threshold
        return
    with pytest.raises(ConfigError, match=error):
        SignaturePolicy.from_pem(keys, threshold=threshold)


def test_pae_matches_the_dsse_spec_example() -> None:
    # https://github.com/secure-systems-lab/dsse/blob/master/protocol.md#test-vectors
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_result_without_keys_verified_is_denied() -> None:
    assert not VerificationResult((), threshold=1).allowed
