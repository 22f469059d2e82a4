"""Cosign signature formats parsed from bytes, without I/O: what a signature object holds.

Legacy format (https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md): the
tag ``sha256-<hex>.sig`` (``.att`` for attestations) holds a manifest whose layers are
payloads, each signed by its layer annotation ``dev.cosignproject.cosign/signature``
(base64), optionally with a Rekor SET (``dev.sigstore.cosign/bundle``), a Fulcio
certificate and chain (``dev.sigstore.cosign/certificate``, ``…/chain``: keyless) and an
RFC 3161 timestamp (``dev.sigstore.cosign/rfc3161timestamp``). Signature layers hold a
"simple signing" payload; attestation layers (``application/vnd.dsse.envelope.v1+json``)
a DSSE envelope whose signature is over its pre-authentication encoding.

Bundle format (cosign v3; https://github.com/sigstore/cosign/blob/main/specs/BUNDLE_SPEC.md):
an OCI artifact with ``artifactType`` ``application/vnd.dev.sigstore.bundle.v0.3+json``
refers to the image; its single layer is a Sigstore bundle (``proxy.trust.bundles``).

The checks themselves live in ``proxy.trust.checks``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.errors import DigestInvalid, SignatureInvalid
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import DOCKER_MANIFEST, OCI_MANIFEST
from proxy.trust import rekor
from proxy.trust.documents import json_object, parse_json

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
REKOR_ANNOTATION = "dev.sigstore.cosign/bundle"
CERTIFICATE_ANNOTATION = "dev.sigstore.cosign/certificate"
CHAIN_ANNOTATION = "dev.sigstore.cosign/chain"
TIMESTAMP_ANNOTATION = "dev.sigstore.cosign/rfc3161timestamp"
SIMPLESIGNING_TYPE = "cosign container image signature"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPES = frozenset({"https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1"})
SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
MAX_SIGNATURES = 64  # layers per .sig manifest, bundles per image: beyond is abuse, not signing
# Log entries, timestamps and DSSE signatures per object: cosign writes one of each. Each
# costs signature checks, so an upstream cannot make one verification cost seconds.
MAX_PER_OBJECT = 8


class Reason(StrEnum):
    """Why a signer did not verify; the values appear verbatim in admission deny messages.
    Ordered by how far verification got: a later reason says more than an earlier one."""

    NO_SIGNATURE = "no signature found"
    WRONG_PREDICATE = "statement has another predicate type"
    BAD_SIGNATURE = "signature does not verify"
    DIGEST_MISMATCH = "payload digest mismatch"
    NOT_IN_TLOG = "not in transparency log"
    UNTRUSTED_LOG = "transparency log entry not signed by a trusted log"
    BAD_INCLUSION_PROOF = "transparency log inclusion proof invalid"
    LOG_ENTRY_MISMATCH = "transparency log entry is for another signature or artifact"
    BAD_TIMESTAMP = "timestamp invalid"
    UNTRUSTED_CERTIFICATE = "certificate not issued by a trusted CA"
    CERT_NOT_VALID_AT_TIME = "certificate not valid at the signing time"
    BAD_SCT = "certificate transparency (SCT) invalid"
    ISSUER_MISMATCH = "certificate issuer mismatch"
    IDENTITY_MISMATCH = "certificate identity mismatch"
    EXTENSION_MISMATCH = "certificate extension mismatch"
    CONDITION_FAILED = "attestation condition not met"
    TOO_OLD = "attestation too old"
    ALREADY_COUNTED = "its signer already counts for another identity"


# How far a signature got: a later failure says more than an earlier one.
REASON_RANK = {reason: rank for rank, reason in enumerate(Reason)}


@dataclass(frozen=True, slots=True)
class SignatureLayer:
    """One layer of a legacy ``.sig``/``.att`` manifest, before its blob is fetched."""

    digest: Digest
    signature: str  # base64, as annotated ("" for DSSE layers: the envelope holds it)
    rekor_bundle: str | None
    media_type: str = SIMPLESIGNING_MEDIA_TYPE
    certificate: str | None = None  # PEM
    timestamp: str | None = None  # the annotation's JSON


@dataclass(frozen=True, slots=True)
class SimpleSignature:
    payload: bytes
    signature: bytes
    log_entry: rekor.LogEntry | None
    origin: str  # where it came from, for details
    certificate: bytes | None = None  # the Fulcio leaf (PEM or DER): a keyless signature
    timestamps: tuple[bytes, ...] = ()  # RFC 3161 responses (DER)


@dataclass(frozen=True, slots=True)
class BundleSignature:
    """A DSSE envelope (``payload_type`` set) or a message signature (``message_digest``
    set: the SHA-256 of the signed artifact, ``payload`` empty)."""

    payload_type: str
    payload: bytes
    signatures: tuple[bytes, ...]
    log_entries: tuple[rekor.LogEntry, ...]
    origin: str
    certificate: bytes | None = None
    timestamps: tuple[bytes, ...] = ()
    message_digest: bytes | None = None


Signature = SimpleSignature | BundleSignature


def _digest(value: Any, what: str) -> Digest:
    try:
        return Digest.parse(value if isinstance(value, str) else "")
    except DigestInvalid as exc:
        raise SignatureInvalid(f"{what}: {exc.message}") from exc


def signature_layers(manifest: bytes) -> list[SignatureLayer]:
    """The signed layers of a legacy ``sha256-<hex>.sig`` (or ``.att``) manifest."""
    doc = json_object(manifest, "signature manifest")
    if doc.get("mediaType", OCI_MANIFEST) not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise SignatureInvalid(f"signature manifest has media type {doc.get('mediaType')!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SignatureInvalid("signature manifest has no layers list")
    found: list[SignatureLayer] = []
    for layer in layers[:MAX_SIGNATURES]:
        if not isinstance(layer, dict) or layer.get("mediaType") not in (SIMPLESIGNING_MEDIA_TYPE, DSSE_MEDIA_TYPE):
            continue
        annotations = layer.get("annotations") or {}
        if not isinstance(annotations, dict):
            continue
        signature = annotations.get(SIGNATURE_ANNOTATION)
        if not isinstance(signature, str):
            continue
        found.append(
            SignatureLayer(
                _digest(layer.get("digest"), "signature layer digest"),
                signature,
                _text(annotations.get(REKOR_ANNOTATION)),
                str(layer["mediaType"]),
                _text(annotations.get(CERTIFICATE_ANNOTATION)),
                _text(annotations.get(TIMESTAMP_ANNOTATION)),
            )
        )
    return found


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def simple_signature(layer: SignatureLayer, payload: bytes, origin: str) -> Signature:
    """A legacy signature from its layer and blob: a simple-signing payload, or (``.att``)
    a DSSE envelope. Unusable log or timestamp annotations are dropped: they matter only
    when required, and then their absence is reported."""
    entry = None
    if layer.rekor_bundle:
        try:
            entry = rekor.from_cosign_annotation(layer.rekor_bundle)
        except SignatureInvalid:
            entry = None
    certificate = layer.certificate.encode() if layer.certificate else None
    timestamps = _legacy_timestamp(layer.timestamp)
    if layer.media_type == DSSE_MEDIA_TYPE:
        return _legacy_envelope(payload, entry, origin, certificate, timestamps)
    try:
        # Real annotations may wrap long (RSA) signatures in newlines; strict otherwise.
        signature = base64.b64decode("".join(layer.signature.split()), validate=True)
    except binascii.Error:
        signature = b""  # cannot verify; reported as such rather than as "not found"
    return SimpleSignature(payload, signature, entry, origin, certificate, timestamps)


def _legacy_envelope(
    blob: bytes,
    entry: rekor.LogEntry | None,
    origin: str,
    certificate: bytes | None,
    timestamps: tuple[bytes, ...],
) -> BundleSignature:
    """``cosign attest`` (legacy): the layer blob is the DSSE envelope itself."""
    try:
        envelope = json_object(blob, "attestation envelope")
        return BundleSignature(
            payload_type=str(envelope["payloadType"]),
            payload=b64(envelope["payload"]),
            signatures=tuple(b64(s["sig"]) for s in envelope["signatures"][:MAX_PER_OBJECT]),
            log_entries=(entry,) if entry is not None else (),
            origin=origin,
            certificate=certificate,
            timestamps=timestamps,
        )
    except (SignatureInvalid, KeyError, TypeError, binascii.Error, ValueError) as exc:
        return BundleSignature("", b"", (), (), f"{origin}: unusable DSSE envelope ({exc})")


def _legacy_timestamp(text: str | None) -> tuple[bytes, ...]:
    if not text:
        return ()
    try:
        doc = json_object(text, "timestamp annotation")
        return (b64(doc["SignedRFC3161Timestamp"]),)
    except (SignatureInvalid, KeyError, TypeError, binascii.Error, ValueError):
        return ()


def bundle_manifests(index: Any) -> list[Digest]:
    """Manifests in a referrers index (API answer or tag fallback) that may be bundles: those
    typed as bundles, and untyped ones (tools that rewrite the index, e.g. skopeo 1.9, drop
    ``artifactType``), which ``bundle_layer`` then decides on from the manifest itself."""
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise SignatureInvalid("referrers answer is not an image index")
    found: list[Digest] = []
    for entry in index["manifests"]:
        if isinstance(entry, dict) and entry.get("artifactType", BUNDLE_MEDIA_TYPE) == BUNDLE_MEDIA_TYPE:
            found.append(_digest(entry.get("digest"), "referrer digest"))
    return found[:MAX_SIGNATURES]


def bundle_layer(manifest: bytes) -> Digest | None:
    """The bundle blob an artifact manifest points at; None if it is another artifact."""
    doc = json_object(manifest, "referrer manifest")
    if doc.get("artifactType") != BUNDLE_MEDIA_TYPE:
        return None
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers or not isinstance(layers[0], dict):
        raise SignatureInvalid("Sigstore bundle artifact has no layer")
    return _digest(layers[0].get("digest"), "bundle layer digest")


def b64(text: Any) -> bytes:
    """Base64 as Sigstore writes it (padding optional)."""
    if not isinstance(text, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what a DSSE signature actually signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def statement(payload_type: str, payload: bytes) -> dict[str, Any] | None:
    """The in-toto statement a DSSE payload holds, or None."""
    if payload_type != INTOTO_PAYLOAD_TYPE:
        return None
    try:
        doc = parse_json(payload, "statement")
    except SignatureInvalid:
        return None
    return doc if isinstance(doc, dict) and doc.get("_type") in STATEMENT_TYPES else None


def subject_digests(doc: dict[str, Any]) -> list[str]:
    subjects = doc.get("subject")
    if not isinstance(subjects, list):
        return []
    found: list[str] = []
    for subject in subjects:
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if isinstance(digest, dict):
            found.extend(f"{alg}:{value}" for alg, value in digest.items())
    return found
