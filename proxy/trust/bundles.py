"""Sigstore bundles (``application/vnd.dev.sigstore.bundle+json;version=0.1``, ``…0.2``,
``application/vnd.dev.sigstore.bundle.v0.3+json``), parsed into a ``BundleSignature``.

Spec: https://github.com/sigstore/protobuf-specs/blob/main/protos/sigstore_bundle.proto.
Content is a DSSE envelope (cosign v3 signatures and attestations) or a message signature
(a signed blob's digest). Verification material is a certificate (v0.3), an
``x509CertificateChain`` whose first certificate is the leaf (v0.1/v0.2), or a public-key
hint (keyed; the hint is only a hint: the key comes from the policy). Log entries and
RFC 3161 timestamps are kept for ``proxy.trust.checks``.
"""

from __future__ import annotations

import binascii
from typing import Any

from proxy.errors import SignatureInvalid
from proxy.trust import rekor
from proxy.trust.cosign import MAX_PER_OBJECT, BundleSignature, b64
from proxy.trust.documents import json_object

MEDIA_TYPES = frozenset(
    {
        "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle.v0.3+json",
    }
)
_SHA256 = "SHA2_256"


def parse_bundle(blob: bytes, origin: str) -> BundleSignature:
    """A Sigstore bundle; ``SignatureInvalid`` when it is not one we can check."""
    doc = json_object(blob, "Sigstore bundle")
    if doc.get("mediaType") not in MEDIA_TYPES:
        raise SignatureInvalid(f"not a Sigstore bundle (mediaType {doc.get('mediaType')!r})")
    try:
        material = doc.get("verificationMaterial") or {}
        common: dict[str, Any] = {
            "log_entries": _log_entries(material.get("tlogEntries") or []),
            "origin": origin,
            "certificate": _certificate(material),
            "timestamps": _timestamps(material.get("timestampVerificationData")),
        }
        if "dsseEnvelope" in doc:
            envelope = doc["dsseEnvelope"]
            return BundleSignature(
                payload_type=str(envelope["payloadType"]),
                payload=b64(envelope["payload"]),
                signatures=tuple(b64(s["sig"]) for s in envelope["signatures"][:MAX_PER_OBJECT]),
                **common,
            )
        message = doc["messageSignature"]
        digest = message["messageDigest"]
        if digest.get("algorithm") != _SHA256:
            raise SignatureInvalid(f"message digest algorithm {digest.get('algorithm')!r} is not supported")
        return BundleSignature(
            payload_type="",
            payload=b"",
            signatures=(b64(message["signature"]),),
            message_digest=b64(digest["digest"]),
            **common,
        )
    except (KeyError, TypeError, AttributeError, binascii.Error, ValueError) as exc:
        raise SignatureInvalid(f"Sigstore bundle is malformed: {exc!r}") from exc


def _certificate(material: dict[str, Any]) -> bytes | None:
    if material.get("certificate"):
        return b64(material["certificate"]["rawBytes"])
    chain = material.get("x509CertificateChain")
    if chain:
        return b64(chain["certificates"][0]["rawBytes"])
    return None


def _timestamps(data: Any) -> tuple[bytes, ...]:
    if not data:
        return ()
    return tuple(b64(t["signedTimestamp"]) for t in (data.get("rfc3161Timestamps") or [])[:MAX_PER_OBJECT])


def _log_entries(items: Any) -> tuple[rekor.LogEntry, ...]:
    entries: list[rekor.LogEntry] = []
    for item in items[:MAX_PER_OBJECT]:
        try:
            entries.append(rekor.from_bundle_entry(item))
        except SignatureInvalid:
            continue  # unusable log entry: matters only when the log is required
    return tuple(entries)
