"""Rekor transparency-log entries as cosign ships them, checked offline.

An entry comes with a Signed Entry Timestamp (SET): the log's signature over the canonical
JSON of ``{body, integratedTime, logID, logIndex}`` (keys sorted, no whitespace; ``body`` is
the base64 of the canonicalized entry, ``logID`` the hex sha256 of the log key's DER SPKI).
That is the log's promise to include the entry; cosign accepts it in place of an inclusion
proof, and so do we (sigstore-go pkg/tlog/entry.go VerifySET).

Two carriers: the legacy ``dev.sigstore.cosign/bundle`` layer annotation
(``{"SignedEntryTimestamp", "Payload": {body, integratedTime, logIndex, logID}}``) and the
``verificationMaterial.tlogEntries`` of a Sigstore bundle (protobuf JSON:
``logIndex``/``integratedTime`` as decimal strings, ``logId.keyId`` and
``canonicalizedBody`` base64, ``inclusionPromise.signedEntryTimestamp``).

A valid SET only says *something* was logged, so ``covers`` also checks the logged body is
this signature over this payload (entry kinds hashedrekord/rekord for simple signing,
dsse/intoto for DSSE envelopes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from proxy.errors import SignatureInvalid
from proxy.oci import jsondoc
from proxy.trust.keys import VerifyingKey


@dataclass(frozen=True, slots=True)
class LogEntry:
    body: bytes  # the canonicalized entry (JSON), decoded
    integrated_time: int
    log_index: int
    log_id: str  # hex
    signed_entry_timestamp: bytes

    def verify_set(self, log_key: VerifyingKey) -> bool:
        """True when the SET is the log key's signature over this entry."""
        if self.log_id != log_key.key_id:
            return False
        promise = {
            "body": base64.b64encode(self.body).decode(),
            "integratedTime": self.integrated_time,
            "logID": self.log_id,
            "logIndex": self.log_index,
        }
        canonical = json.dumps(promise, sort_keys=True, separators=(",", ":")).encode()
        return log_key.verify(self.signed_entry_timestamp, canonical)

    def covers(self, signature: bytes, payload: bytes) -> bool:
        """True when the logged body records ``signature`` over ``payload``."""
        try:
            entry = jsondoc.parse_object(self.body, "transparency log entry")
            return _covers(entry["kind"], entry["spec"], signature, payload)
        except (jsondoc.JsonInvalid, ValueError, KeyError, TypeError, AttributeError):
            return False


def _covers(kind: str, spec: Any, signature: bytes, payload: bytes) -> bool:
    digest = hashlib.sha256(payload).hexdigest()
    if kind in ("hashedrekord", "rekord"):
        return _hash_is(spec["data"]["hash"], digest) and _b64(spec["signature"]["content"]) == (signature)
    if kind == "dsse":
        sigs = [_b64(s["signature"]) for s in spec["signatures"]]
        return _hash_is(spec["payloadHash"], digest) and signature in sigs
    if kind == "intoto":  # v0.0.2 stores each DSSE signature base64-encoded twice
        sigs = [_b64(s["sig"]) for s in spec["content"]["envelope"]["signatures"]]
        return _hash_is(spec["content"]["payloadHash"], digest) and any(signature in (s, _b64(s)) for s in sigs)
    return False


def _hash_is(hash_obj: Any, hexdigest: str) -> bool:
    return bool(hash_obj["algorithm"] == "sha256" and hash_obj["value"] == hexdigest)


def _b64(text: Any) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        return b""


def from_cosign_annotation(text: str) -> LogEntry:
    """Parse the legacy ``dev.sigstore.cosign/bundle`` annotation."""
    try:
        doc = jsondoc.parse_object(text, "cosign bundle annotation", error=SignatureInvalid)
        payload = doc["Payload"]
        return LogEntry(
            body=base64.b64decode(payload["body"], validate=True),
            integrated_time=_integer(payload["integratedTime"]),
            log_index=_integer(payload["logIndex"]),
            log_id=str(payload["logID"]),
            signed_entry_timestamp=base64.b64decode(doc["SignedEntryTimestamp"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureInvalid(f"malformed cosign bundle annotation: {exc}") from exc


def from_bundle_entry(entry: Any) -> LogEntry | None:
    """Parse one ``tlogEntries`` item; None when it carries no inclusion promise (SET)."""
    try:
        promise = entry.get("inclusionPromise")
        if not promise:
            return None
        return LogEntry(
            body=_protobuf_bytes(entry["canonicalizedBody"]),
            integrated_time=_integer(entry["integratedTime"]),
            log_index=_integer(entry["logIndex"]),
            log_id=_protobuf_bytes(entry["logId"]["keyId"]).hex(),
            signed_entry_timestamp=_protobuf_bytes(promise["signedEntryTimestamp"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise SignatureInvalid(f"malformed transparency log entry: {exc}") from exc


def _integer(value: Any) -> int:
    """protobuf JSON writes int64 as a decimal string; the legacy annotation as a number."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not an integer: {value!r}")
    return int(value)


def _protobuf_bytes(text: Any) -> bytes:
    """protobuf JSON ``bytes``: standard or URL-safe base64, padding optional."""
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    padded = text + "=" * (-len(text) % 4)
    if "-" in text or "_" in text:
        return base64.urlsafe_b64decode(padded)
    return base64.b64decode(padded, validate=True)
