"""Cosign signature formats, parsed from bytes and checked against one key, without I/O.

Legacy format (https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md): the
tag ``sha256-<hex>.sig`` holds a manifest whose ``simplesigning`` layers are payloads, each
signed by its layer annotation ``dev.cosignproject.cosign/signature`` (base64), optionally
with a Rekor SET in ``dev.sigstore.cosign/bundle``.

Bundle format (cosign v3; https://github.com/sigstore/cosign/blob/main/specs/BUNDLE_SPEC.md):
an OCI artifact with ``artifactType`` ``application/vnd.dev.sigstore.bundle.v0.3+json`` refers
to the image; its single layer is a Sigstore bundle whose DSSE envelope signs (through the
pre-authentication encoding, https://github.com/secure-systems-lab/dsse/blob/master/protocol.md)
an in-toto statement with predicate ``https://sigstore.dev/cosign/sign/v1`` about the image.

``check`` applies one key to one signature and answers with the furthest step that failed,
in the order the checks run: the signature, then the digest the payload names, then the log.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.errors import DigestInvalid, SignatureInvalid
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import DOCKER_MANIFEST, OCI_MANIFEST
from proxy.trust import rekor
from proxy.trust.keys import VerifyingKey

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
REKOR_ANNOTATION = "dev.sigstore.cosign/bundle"
SIMPLESIGNING_TYPE = "cosign container image signature"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPES = frozenset({"https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1"})
SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
MAX_SIGNATURES = 64  # layers per .sig manifest, bundles per image: beyond is abuse, not signing


class Reason(StrEnum):
    """Why a key did not verify; the values appear verbatim in admission deny messages."""

    NO_SIGNATURE = "no signature found"
    BAD_SIGNATURE = "signature does not verify"
    DIGEST_MISMATCH = "payload digest mismatch"
    NOT_IN_TLOG = "not in transparency log"


# How far a signature got: a later failure says more than an earlier one.
REASON_RANK = {reason: rank for rank, reason in enumerate(Reason)}


@dataclass(frozen=True, slots=True)
class Outcome:
    reason: Reason | None  # None: verified
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SignatureLayer:
    """One layer of a legacy ``.sig`` manifest, before its payload blob is fetched."""

    digest: Digest
    signature: str  # base64, as annotated
    rekor_bundle: str | None


@dataclass(frozen=True, slots=True)
class SimpleSignature:
    payload: bytes
    signature: bytes
    log_entry: rekor.LogEntry | None
    origin: str  # where it came from, for details


@dataclass(frozen=True, slots=True)
class BundleSignature:
    payload_type: str
    payload: bytes
    signatures: tuple[bytes, ...]
    log_entries: tuple[rekor.LogEntry, ...]
    origin: str


Signature = SimpleSignature | BundleSignature


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    return jsondoc.parse_object(data, what, error=SignatureInvalid)


def _digest(value: Any, what: str) -> Digest:
    try:
        return Digest.parse(value if isinstance(value, str) else "")
    except DigestInvalid as exc:
        raise SignatureInvalid(f"{what}: {exc.message}") from exc


def signature_layers(manifest: bytes) -> list[SignatureLayer]:
    """The signed layers of a legacy ``sha256-<hex>.sig`` manifest."""
    doc = _json_object(manifest, "signature manifest")
    if doc.get("mediaType", OCI_MANIFEST) not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise SignatureInvalid(f"signature manifest has media type {doc.get('mediaType')!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SignatureInvalid("signature manifest has no layers list")
    found: list[SignatureLayer] = []
    for layer in layers[:MAX_SIGNATURES]:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLESIGNING_MEDIA_TYPE:
            continue
        annotations = layer.get("annotations") or {}
        signature = annotations.get(SIGNATURE_ANNOTATION)
        if not isinstance(signature, str):
            continue
        bundle = annotations.get(REKOR_ANNOTATION)
        digest = _digest(layer.get("digest"), "signature layer digest")
        found.append(SignatureLayer(digest, signature, bundle if isinstance(bundle, str) else None))
    return found


def simple_signature(layer: SignatureLayer, payload: bytes, origin: str) -> SimpleSignature:
    """A legacy signature from its layer and payload blob; a bad log annotation raises."""
    entry = None
    if layer.rekor_bundle:
        try:
            entry = rekor.from_cosign_annotation(layer.rekor_bundle)
        except SignatureInvalid:
            entry = None  # unusable log entry: matters only when the log is required
    try:
        # Real annotations may wrap long (RSA) signatures in newlines; strict otherwise.
        signature = base64.b64decode("".join(layer.signature.split()), validate=True)
    except binascii.Error:
        signature = b""  # cannot verify; reported as such rather than as "not found"
    return SimpleSignature(payload, signature, entry, origin)


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
    doc = _json_object(manifest, "referrer manifest")
    if doc.get("artifactType") != BUNDLE_MEDIA_TYPE:
        return None
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers or not isinstance(layers[0], dict):
        raise SignatureInvalid("Sigstore bundle artifact has no layer")
    return _digest(layers[0].get("digest"), "bundle layer digest")


def parse_bundle(blob: bytes, origin: str) -> BundleSignature:
    """A Sigstore bundle holding a DSSE envelope (message-signature bundles are refused)."""
    doc = _json_object(blob, "Sigstore bundle")
    try:
        envelope = doc["dsseEnvelope"]
        signatures = tuple(_b64(s["sig"]) for s in envelope["signatures"][:MAX_SIGNATURES])
        material = doc.get("verificationMaterial") or {}
        return BundleSignature(
            payload_type=str(envelope["payloadType"]),
            payload=_b64(envelope["payload"]),
            signatures=signatures,
            log_entries=_log_entries(material.get("tlogEntries") or []),
            origin=origin,
        )
    except (KeyError, TypeError, AttributeError, binascii.Error, ValueError) as exc:
        raise SignatureInvalid(f"Sigstore bundle has no usable DSSE envelope: {exc}") from exc


def _log_entries(items: Any) -> tuple[rekor.LogEntry, ...]:
    entries: list[rekor.LogEntry] = []
    for item in items[:MAX_SIGNATURES]:
        try:
            entry = rekor.from_bundle_entry(item)
        except SignatureInvalid:
            continue  # unusable log entry: matters only when the log is required
        if entry is not None:
            entries.append(entry)
    return tuple(entries)


def _b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what a DSSE signature actually signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def check(
    signature: Signature,
    key: VerifyingKey,
    digests: Collection[Digest],
    log_key: VerifyingKey | None,
) -> Outcome:
    """Does ``signature`` verify with ``key`` for one of ``digests`` (and the log, if given)?"""
    if isinstance(signature, SimpleSignature):
        return _check_simple(signature, key, digests, log_key)
    return _check_bundle(signature, key, digests, log_key)


def _check_simple(
    sig: SimpleSignature,
    key: VerifyingKey,
    digests: Collection[Digest],
    log_key: VerifyingKey | None,
) -> Outcome:
    if not key.verify(sig.signature, sig.payload):
        return Outcome(Reason.BAD_SIGNATURE, f"{sig.origin}: not signed by this key")
    try:
        critical = _json_object(sig.payload, "payload")["critical"]
        named, kind = critical["image"]["docker-manifest-digest"], critical["type"]
    except (SignatureInvalid, KeyError, TypeError) as exc:
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: malformed payload: {exc}")
    if kind != SIMPLESIGNING_TYPE:
        return Outcome(Reason.NO_SIGNATURE, f"{sig.origin}: payload type {kind!r}")
    if not _names_candidate(named, digests):
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: payload names {named}")
    if log_key is None:
        return Outcome(None, sig.origin)
    entry = sig.log_entry
    if entry is None:
        return Outcome(Reason.NOT_IN_TLOG, f"{sig.origin}: no transparency log bundle")
    if not entry.verify_set(log_key):
        return Outcome(Reason.NOT_IN_TLOG, f"{sig.origin}: log promise not signed by the log key")
    if not entry.covers(sig.signature, sig.payload):
        return Outcome(Reason.NOT_IN_TLOG, f"{sig.origin}: log entry is for another signature")
    return Outcome(None, sig.origin)


def _check_bundle(
    sig: BundleSignature,
    key: VerifyingKey,
    digests: Collection[Digest],
    log_key: VerifyingKey | None,
) -> Outcome:
    statement = _statement(sig)
    if statement is not None and statement.get("predicateType") != SIGN_PREDICATE:
        # An attestation (SBOM, provenance) by the same key is not a signature.
        return Outcome(Reason.NO_SIGNATURE, f"{sig.origin}: not a cosign signature statement")
    message = pae(sig.payload_type, sig.payload)
    good = [s for s in sig.signatures if key.verify(s, message)]
    if not good:
        return Outcome(Reason.BAD_SIGNATURE, f"{sig.origin}: not signed by this key")
    if statement is None or sig.payload_type != INTOTO_PAYLOAD_TYPE:
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: payload is not an in-toto statement")
    named = _subject_digests(statement)
    if not any(_names_candidate(d, digests) for d in named):
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: statement names {named}")
    if log_key is None:
        return Outcome(None, sig.origin)
    for entry in sig.log_entries:
        if entry.verify_set(log_key) and any(entry.covers(s, sig.payload) for s in good):
            return Outcome(None, sig.origin)
    return Outcome(Reason.NOT_IN_TLOG, f"{sig.origin}: no log entry promised by the log key")


def _statement(sig: BundleSignature) -> dict[str, Any] | None:
    try:
        doc = _json_object(sig.payload, "statement")
    except SignatureInvalid:
        return None
    return doc if doc.get("_type") in STATEMENT_TYPES else None


def _subject_digests(statement: dict[str, Any]) -> list[str]:
    subjects = statement.get("subject")
    if not isinstance(subjects, list):
        return []
    found: list[str] = []
    for subject in subjects:
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if isinstance(digest, dict):
            found.extend(f"{alg}:{value}" for alg, value in digest.items())
    return found


def _names_candidate(named: Any, digests: Collection[Digest]) -> bool:
    try:
        return Digest.parse(named if isinstance(named, str) else "") in digests
    except DigestInvalid:
        return False
