"""A test signer that writes what cosign writes, and an in-memory registry to read it back.

Legacy format (cosign <= v2, https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md):
``sign_legacy`` returns the ``sha256-<hex>.sig`` manifest, its config and payload blobs,
one ``simplesigning`` layer per signer, annotated with the base64 signature and, with a
``Rekor``, the ``dev.sigstore.cosign/bundle`` SET annotation (a hashedrekord entry).

Bundle format (cosign v3, https://github.com/sigstore/cosign/blob/main/specs/BUNDLE_SPEC.md):
``sign_bundle`` returns the Sigstore bundle blob (DSSE envelope over an in-toto statement
with predicate https://sigstore.dev/cosign/sign/v1), the artifact manifest (``artifactType``,
empty config, ``subject``) and the referrers-tag-schema index under ``sha256-<hex>``.

``Rekor`` is a stand-in transparency log with its own P-256 key: it signs Signed Entry
Timestamps exactly as rekor.sigstore.dev does, so the verifier cannot tell them apart.
``write_oci_layout`` puts an ``Artifact`` in an OCI layout dir for
``skopeo copy oci:DIR:TAG docker://HOST/REPO:TAG`` (``--all`` for the bundle's index).
``MemoryRegistry`` is a ``proxy.trust.verification.SignatureSource`` over dicts.

The shapes (annotation keys, payload bytes, SET annotation, log body) are checked against
real cosign output in ``tests/test_signer_vectors.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa

from proxy.oci.digest import Digest
from proxy.trust.cosign import (
    BUNDLE_MEDIA_TYPE,
    INTOTO_PAYLOAD_TYPE,
    REKOR_ANNOTATION,
    SIGN_PREDICATE,
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    SIMPLESIGNING_TYPE,
    pae,
)
from tests.support.images import Descriptor, OciLayout

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"

KeyKind = Literal["ecdsa-p256", "ecdsa-p384", "rsa-pkcs1", "rsa-pss", "ed25519"]
UnsupportedKind = Literal["dsa", "secp256k1", "rsa-1024"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _compact(value: Any) -> bytes:
    """Go's encoding/json output: compact, fields in struct order (= our insertion order)."""
    return json.dumps(value, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class SigningKey:
    """A private key as ``cosign generate-key-pair`` (or a KMS) would hold it."""

    kind: KeyKind
    private: PrivateKey

    def sign(self, data: bytes) -> bytes:
        key = self.private
        if isinstance(key, ec.EllipticCurvePrivateKey):
            digest = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
            return key.sign(data, ec.ECDSA(digest))
        if isinstance(key, rsa.RSAPrivateKey):
            if self.kind == "rsa-pss":
                mgf = padding.MGF1(hashes.SHA256())
                pss = padding.PSS(mgf=mgf, salt_length=padding.PSS.DIGEST_LENGTH)
                return key.sign(data, pss, hashes.SHA256())
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return key.sign(data)

    @property
    def public_pem(self) -> bytes:
        return _public_pem(self.private.public_key())


def _public_pem(key: Any) -> bytes:
    data: bytes = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def generate_key(kind: KeyKind = "ecdsa-p256") -> SigningKey:
    private: PrivateKey
    if kind == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ecdsa-p384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif kind in ("rsa-pkcs1", "rsa-pss"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return SigningKey(kind, private)


def unsupported_public_pem(kind: UnsupportedKind) -> bytes:
    """A PEM public key of a type the verifier must refuse."""
    if kind == "dsa":
        return _public_pem(dsa.generate_private_key(2048).public_key())
    if kind == "secp256k1":
        return _public_pem(ec.generate_private_key(ec.SECP256K1()).public_key())
    return _public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())


@dataclass
class Rekor:
    """A stand-in transparency log: hands out entries with Signed Entry Timestamps."""

    key: SigningKey = field(default_factory=generate_key)
    integrated_time: int = 1_700_000_000
    next_index: int = 1000

    @property
    def public_pem(self) -> bytes:
        return self.key.public_pem

    @property
    def log_id(self) -> str:
        der = self.key.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()

    def _log(self, body: bytes) -> tuple[dict[str, Any], str]:
        """The promise fields and its SET for a new entry with ``body``."""
        self.next_index += 1
        promise = {
            "body": _b64(body),
            "integratedTime": self.integrated_time,
            "logIndex": self.next_index,
            "logID": self.log_id,
        }
        canonical = json.dumps(promise, sort_keys=True, separators=(",", ":")).encode()
        return promise, _b64(self.key.sign(canonical))

    def hashedrekord_annotation(self, signature: bytes, payload: bytes, public_pem: bytes) -> str:
        """The ``dev.sigstore.cosign/bundle`` annotation cosign attaches to a logged layer."""
        body = _compact(
            {
                "apiVersion": "0.0.1",
                "kind": "hashedrekord",
                "spec": {
                    "data": {"hash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()}},
                    "signature": {
                        "content": _b64(signature),
                        "publicKey": {"content": _b64(public_pem)},
                    },
                },
            }
        )
        promise, signed = self._log(body)
        return _compact({"SignedEntryTimestamp": signed, "Payload": promise}).decode()

    def dsse_entry(self, envelope: bytes, payload: bytes, signature: bytes, public_pem: bytes) -> dict[str, Any]:
        """A ``tlogEntries`` item (protobuf JSON) for a logged DSSE envelope."""
        sha = {"algorithm": "sha256"}
        body = _compact(
            {
                "apiVersion": "0.0.1",
                "kind": "dsse",
                "spec": {
                    "envelopeHash": {**sha, "value": hashlib.sha256(envelope).hexdigest()},
                    "payloadHash": {**sha, "value": hashlib.sha256(payload).hexdigest()},
                    "signatures": [{"signature": _b64(signature), "verifier": _b64(public_pem)}],
                },
            }
        )
        promise, signed = self._log(body)
        return {
            "logIndex": str(promise["logIndex"]),
            "logId": {"keyId": _b64(bytes.fromhex(self.log_id))},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"},
            "integratedTime": str(self.integrated_time),
            "inclusionPromise": {"signedEntryTimestamp": signed},
            "canonicalizedBody": promise["body"],
        }


@dataclass(frozen=True)
class Artifact:
    """Registry objects: manifests by digest, the tags naming some, and blobs."""

    manifests: dict[str, tuple[bytes, str]]  # digest -> (bytes, media type)
    tags: dict[str, str]  # tag -> manifest digest
    blobs: dict[str, bytes]  # digest -> bytes

    @property
    def tag(self) -> str:
        return next(iter(self.tags))


def _manifest_artifact(manifest: Mapping[str, Any], media_type: str, blobs: Sequence[bytes]) -> tuple[str, Artifact]:
    data = _compact(manifest)
    digest = str(Digest.of(data))
    return digest, Artifact({digest: (data, media_type)}, {}, {str(Digest.of(b)): b for b in blobs})


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "size": len(data), "digest": str(Digest.of(data)), **extra}


# --- legacy (.sig tag) -------------------------------------------------------------------
def simple_signing_payload(digest: str, reference: str, optional: Any = None) -> bytes:
    """The exact payload bytes ``cosign sign`` writes (payload.Cosign, Go field order)."""
    return _compact(
        {
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": digest},
                "type": SIMPLESIGNING_TYPE,
            },
            "optional": optional,
        }
    )


@dataclass(frozen=True)
class SimpleSigningLayer:
    payload: bytes
    signature: bytes
    rekor_bundle: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # e.g. keyless certificate and chain

    def annotations(self) -> dict[str, str]:
        out = {SIGNATURE_ANNOTATION: _b64(self.signature)}
        if self.rekor_bundle is not None:
            out[REKOR_ANNOTATION] = self.rekor_bundle
        return {**out, **self.extra}


def sign_payload(key: SigningKey, payload: bytes, rekor: Rekor | None = None) -> SimpleSigningLayer:
    signature = key.sign(payload)
    logged = rekor.hashedrekord_annotation(signature, payload, key.public_pem) if rekor else None
    return SimpleSigningLayer(payload, signature, logged)


def legacy_artifact(
    digest: str,
    layers: Sequence[SimpleSigningLayer],
    *,
    suffix: str = ".sig",
    media_type: str = SIMPLESIGNING_MEDIA_TYPE,
) -> Artifact:
    """The ``sha256-<hex>.sig`` manifest holding ``layers`` (as go-containerregistry writes
    it for cosign: an OCI manifest whose config lists the payloads as rootfs diff_ids);
    ``cosign attest`` writes ``.att`` with DSSE envelope layers."""
    config = _compact(
        {
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"} for _ in layers],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(x.payload)) for x in layers]},
            "config": {},
        }
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config),
        "layers": [_descriptor(media_type, x.payload, annotations=x.annotations()) for x in layers],
    }
    blobs = [config, *(x.payload for x in layers)]
    manifest_digest, artifact = _manifest_artifact(manifest, OCI_MANIFEST, blobs)
    parsed = Digest.parse(digest)
    artifact.tags[f"{parsed.algorithm}-{parsed.hex}{suffix}"] = manifest_digest
    return artifact


def sign_legacy(digest: str, reference: str, keys: Sequence[SigningKey], rekor: Rekor | None = None) -> Artifact:
    """``cosign sign --key`` by each of ``keys`` (``--tlog-upload`` when ``rekor`` is set)."""
    payload = simple_signing_payload(digest, reference)
    return legacy_artifact(digest, [sign_payload(key, payload, rekor) for key in keys])


# --- Sigstore bundle (referrers) ---------------------------------------------------------
def cosign_statement(digest: str, reference: str, predicate_type: str = SIGN_PREDICATE) -> bytes:
    algorithm, _, hexpart = digest.partition(":")
    return _compact(
        {
            "_type": STATEMENT_V1,
            "subject": [{"name": reference, "digest": {algorithm: hexpart}}],
            "predicateType": predicate_type,
            "predicate": {},
        }
    )


def dsse_bundle(key: SigningKey, statement: bytes, rekor: Rekor | None = None) -> bytes:
    """A Sigstore bundle v0.3 with a DSSE envelope signed by ``key``."""
    signature = key.sign(pae(INTOTO_PAYLOAD_TYPE, statement))
    envelope = {
        "payload": _b64(statement),
        "payloadType": INTOTO_PAYLOAD_TYPE,
        "signatures": [{"sig": _b64(signature), "keyid": ""}],
    }
    entries = []
    if rekor is not None:
        entries.append(rekor.dsse_entry(_compact(envelope), statement, signature, key.public_pem))
    key_id = hashlib.sha256(key.public_pem).digest()
    return _compact(
        {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"publicKey": {"hint": _b64(key_id)}, "tlogEntries": entries},
            "dsseEnvelope": envelope,
        }
    )


def bundle_artifact(subject: str, subject_media_type: str, subject_size: int, bundles: Sequence[bytes]) -> Artifact:
    """One artifact manifest per bundle, referring to ``subject``, plus the referrers-tag
    index ``sha256-<hex>`` listing them (what cosign writes without a referrers API)."""
    manifests: dict[str, tuple[bytes, str]] = {}
    blobs: dict[str, bytes] = {str(Digest.of(EMPTY_JSON)): EMPTY_JSON}
    entries = []
    for bundle in bundles:
        predicate = json.loads(base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"]))
        annotations = {
            "dev.sigstore.bundle.content": "dsse-envelope",
            "dev.sigstore.bundle.predicateType": predicate["predicateType"],
            "org.opencontainers.image.created": "2025-01-01T00:00:00Z",
        }
        bundle_digest = Digest.of(bundle)
        layer_title = {"org.opencontainers.image.title": f"sha256-{bundle_digest.hex}.sigstore.json"}
        manifest = {
            "mediaType": OCI_MANIFEST,
            "schemaVersion": 2,
            "artifactType": BUNDLE_MEDIA_TYPE,
            "config": _descriptor(OCI_EMPTY, EMPTY_JSON),
            "layers": [_descriptor(BUNDLE_MEDIA_TYPE, bundle, annotations=layer_title)],
            "subject": {"mediaType": subject_media_type, "size": subject_size, "digest": subject},
            "annotations": annotations,
        }
        digest, one = _manifest_artifact(manifest, OCI_MANIFEST, [bundle])
        manifests.update(one.manifests)
        blobs.update(one.blobs)
        data = one.manifests[digest][0]
        entries.append(_descriptor(OCI_MANIFEST, data, artifactType=BUNDLE_MEDIA_TYPE, annotations=annotations))
    index = _compact({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    index_digest = str(Digest.of(index))
    manifests[index_digest] = (index, OCI_INDEX)
    parsed = Digest.parse(subject)
    return Artifact(manifests, {f"{parsed.algorithm}-{parsed.hex}": index_digest}, blobs)


def sign_bundle(
    digest: str,
    reference: str,
    keys: Sequence[SigningKey],
    rekor: Rekor | None = None,
    *,
    subject_media_type: str = OCI_MANIFEST,
    subject_size: int = 1234,
) -> Artifact:
    """``cosign sign --key`` (v3, bundle format) by each of ``keys``."""
    statement = cosign_statement(digest, reference)
    bundles = [dsse_bundle(key, statement, rekor) for key in keys]
    return bundle_artifact(digest, subject_media_type, subject_size, bundles)


# --- output ------------------------------------------------------------------------------
def write_oci_layout(directory: Path | str, artifact: Artifact) -> Path:
    """Write ``artifact`` as an OCI image layout; each of its tags becomes a ref name."""
    layout = OciLayout(directory)
    for data in artifact.blobs.values():
        layout.write_blob(data, "application/octet-stream")
    for data, media_type in artifact.manifests.values():
        layout.write_blob(data, media_type)
    for tag, digest in artifact.tags.items():
        data, media_type = artifact.manifests[digest]
        layout.tag(Descriptor(media_type, digest, len(data)), tag)
    return layout.root


class MemoryRegistry:
    """``SignatureSource`` over dicts; ``referrers_api=False`` behaves like a registry
    without the OCI 1.1 referrers API (so the ``sha256-<hex>`` tag is used instead)."""

    def __init__(self, *, referrers_api: bool = True) -> None:
        self.referrers_api = referrers_api
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str, str]] = []

    def push(self, repository: str, artifact: Artifact) -> None:
        for digest, manifest in artifact.manifests.items():
            self.manifests[(repository, digest)] = manifest
        for tag, digest in artifact.tags.items():
            self.manifests[(repository, tag)] = artifact.manifests[digest]
        for digest, data in artifact.blobs.items():
            self.blobs[(repository, digest)] = data

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        self.requests.append(("manifest", repository, reference))
        return self.manifests.get((repository, reference))

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None:
        self.requests.append(("blob", repository, str(digest)))
        return self.blobs.get((repository, str(digest)))

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        self.requests.append(("referrers", repository, str(digest)))
        if not self.referrers_api:
            return None
        entries = []
        for (repo, reference), (data, media_type) in self.manifests.items():
            if repo != repository or reference != str(Digest.of(data)):
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if (doc.get("subject") or {}).get("digest") != str(digest):
                continue
            if artifact_type is not None and doc.get("artifactType") != artifact_type:
                continue
            extra = {"artifactType": doc.get("artifactType"), "annotations": doc.get("annotations") or {}}
            entries.append(_descriptor(media_type, data, **extra))
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
