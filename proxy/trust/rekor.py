"""Rekor transparency-log entries as cosign and Sigstore bundles ship them, checked offline.

Two proofs that an entry is in the log, either suffices:
- a Signed Entry Timestamp (SET, Rekor v1 only): the log's signature over the canonical JSON
  of ``{body, integratedTime, logID, logIndex}`` (keys sorted, no whitespace; ``body`` the
  base64 of the canonicalized entry, ``logID`` hex). It also vouches for the integrated
  time, which is then a verified signing time (sigstore-go pkg/tlog/entry.go VerifySET).
- an inclusion proof with a signed checkpoint (Rekor v1 and v2): the Merkle audit path from
  the entry's leaf hash to the root (RFC 9162 §2.1.3.2), and the log's signed note naming
  that root and tree size (https://github.com/transparency-dev/formats/blob/main/log/README.md).
  It says nothing about time: Rekor v2 entries carry none, so their signing time comes from
  an RFC 3161 timestamp.

Carriers: the legacy ``dev.sigstore.cosign/bundle`` layer annotation
(``{"SignedEntryTimestamp", "Payload": {body, integratedTime, logIndex, logID}}``) and the
``verificationMaterial.tlogEntries`` of a Sigstore bundle (protobuf JSON: int64 as decimal
strings, bytes as base64).

A valid proof only says *something* was logged, so ``covers`` also checks the logged body
records this signature, over this content, by this signer (Rekor v1 kinds hashedrekord,
rekord, dsse, intoto; Rekor v2 hashedrekord/dsse 0.0.2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.errors import SignatureInvalid
from proxy.trust.documents import json_object
from proxy.trust.keys import VerifyingKey


@dataclass(frozen=True, slots=True)
class InclusionProof:
    log_index: int  # the leaf's index in this tree (a shard), not the global log index
    tree_size: int
    root_hash: bytes
    hashes: tuple[bytes, ...]
    checkpoint: str  # the signed note


@dataclass(frozen=True, slots=True)
class Signed:
    """What an entry must record to be "for" a signature: the signature, the digests of
    the signed message and of the payload, and who signed (DER certificate or SPKI)."""

    signature: bytes
    message_sha256: bytes  # what hashedrekord logs: the payload, DSSE PAE, or blob digest
    payload_sha256: bytes  # what dsse/intoto log: the DSSE payload
    signers: frozenset[bytes]  # DER of the signing certificate and/or SPKI; empty: not checked


@dataclass(frozen=True, slots=True)
class LogEntry:
    body: bytes  # the canonicalized entry (JSON), decoded
    integrated_time: int
    log_index: int
    log_id: str  # hex
    signed_entry_timestamp: bytes | None
    proof: InclusionProof | None = None

    def verify_set(self, log_key: VerifyingKey) -> bool:
        """True when the SET is the log key's signature over this entry."""
        if self.signed_entry_timestamp is None or self.log_id != log_key.key_id:
            return False
        promise = {
            "body": base64.b64encode(self.body).decode(),
            "integratedTime": self.integrated_time,
            "logID": self.log_id,
            "logIndex": self.log_index,
        }
        canonical = json.dumps(promise, sort_keys=True, separators=(",", ":")).encode()
        return log_key.verify(self.signed_entry_timestamp, canonical)

    def verify_proof(self, log_key: VerifyingKey) -> str | None:
        """None when the inclusion proof leads to a root the log signed; else why not."""
        proof = self.proof
        if proof is None:
            return "no inclusion proof"
        leaf = hashlib.sha256(b"\x00" + self.body).digest()
        root = root_from_proof(proof.log_index, proof.tree_size, leaf, proof.hashes)
        if root is None or root != proof.root_hash:
            return "inclusion proof does not lead to its root hash"
        return verify_checkpoint(proof.checkpoint, log_key, proof.tree_size, proof.root_hash)

    def covers(self, signed: Signed) -> bool:
        """True when the logged body records ``signed``."""
        try:
            entry = json_object(self.body, "log entry body")
            return _covers(entry["kind"], entry["spec"], signed)
        except (SignatureInvalid, ValueError, KeyError, TypeError, AttributeError):
            return False


def root_from_proof(index: int, size: int, leaf: bytes, proof: tuple[bytes, ...]) -> bytes | None:
    """The Merkle root an audit path implies (RFC 9162 §2.1.3.2), None if malformed."""
    if not 0 <= index < size:
        return None
    fn, sn, node = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            node = hashlib.sha256(b"\x01" + sibling + node).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = hashlib.sha256(b"\x01" + node + sibling).digest()
        fn, sn = fn >> 1, sn >> 1
    return node if sn == 0 else None


def verify_checkpoint(note: str, log_key: VerifyingKey, tree_size: int, root_hash: bytes) -> str | None:
    """A signed note ``origin\\nsize\\nbase64(root)\\n[extra]\\n\\n— name base64(hint+sig)\\n``
    signed by ``log_key`` for exactly this tree size and root; None when it is."""
    text, sep, signatures = note.partition("\n\n")
    if not sep:
        return "checkpoint is not a signed note"
    lines = text.split("\n")
    try:
        size, root = int(lines[1]), base64.b64decode(lines[2], validate=True)
    except (IndexError, ValueError, binascii.Error):
        return "checkpoint body is malformed"
    if size != tree_size or root != root_hash:
        return "checkpoint is for another tree than the inclusion proof"
    signed = (text + "\n").encode()
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            continue
        try:
            raw = base64.b64decode(line.rpartition(" ")[2], validate=True)
        except binascii.Error:
            continue
        if len(raw) > 4 and log_key.verify(raw[4:], signed):  # 4 bytes of key hint first
            return None
    return "checkpoint is not signed by the log key"


def _covers(kind: str, spec: Any, signed: Signed) -> bool:
    if kind in ("hashedrekord", "rekord") and "hashedRekordV002" in spec:
        return _covers_hashedrekord_v2(spec["hashedRekordV002"], signed)
    if kind == "dsse" and "dsseV002" in spec:
        v2 = spec["dsseV002"]
        if not _digest_is(v2["payloadHash"], signed.payload_sha256):
            return False
        return any(
            _b64(s["content"]) == signed.signature and _signer_ok(_v2_verifier(s["verifier"]), signed)
            for s in v2["signatures"]
        )
    if kind in ("hashedrekord", "rekord"):
        logged_signer = _pem_signer(_b64(spec["signature"]["publicKey"]["content"]))
        return (
            _hash_is(spec["data"]["hash"], signed.message_sha256)
            and _b64(spec["signature"]["content"]) == signed.signature
            and _signer_ok(logged_signer, signed)
        )
    if kind == "dsse":
        return _hash_is(spec["payloadHash"], signed.payload_sha256) and any(
            _b64(s["signature"]) == signed.signature and _signer_ok(_pem_signer(_b64(s["verifier"])), signed)
            for s in spec["signatures"]
        )
    if kind == "intoto":  # v0.0.2 stores each DSSE signature base64-encoded twice
        content = spec["content"]
        sigs = [_b64(s["sig"]) for s in content["envelope"]["signatures"]]
        return _hash_is(content["payloadHash"], signed.payload_sha256) and any(
            signed.signature in (s, _b64(s)) for s in sigs
        )
    return False


def _covers_hashedrekord_v2(spec: Any, signed: Signed) -> bool:
    sig = spec["signature"]
    return (
        _digest_is(spec["data"], signed.message_sha256)
        and _b64(sig["content"]) == signed.signature
        and _signer_ok(_v2_verifier(sig["verifier"]), signed)
    )


def _v2_verifier(verifier: Any) -> frozenset[bytes]:
    """Rekor v2 ``Verifier``: ``x509Certificate.rawBytes`` or ``publicKey.rawBytes`` (DER)."""
    if verifier.get("x509Certificate"):
        return _cert_signer(lambda: x509.load_der_x509_certificate(_b64(verifier["x509Certificate"]["rawBytes"])))
    return frozenset({_b64((verifier.get("publicKey") or {}).get("rawBytes"))})


def _signer_ok(logged: frozenset[bytes], signed: Signed) -> bool:
    return not signed.signers or bool(logged & signed.signers)


def _pem_signer(pem: bytes) -> frozenset[bytes]:
    """A logged PEM certificate (its DER and its key's SPKI) or public key (SPKI)."""
    if b"CERTIFICATE" in pem:
        return _cert_signer(lambda: x509.load_pem_x509_certificate(pem))
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        return frozenset()
    return frozenset({key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)})


def _cert_signer(load: Callable[[], x509.Certificate]) -> frozenset[bytes]:
    """A certificate stands for itself and for its key (a keyed check of a keyless
    signature names the certificate's key)."""
    try:
        cert = load()
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError):
        return frozenset()
    return frozenset({cert.public_bytes(serialization.Encoding.DER), spki})


def _hash_is(hash_obj: Any, digest: bytes) -> bool:
    return bool(hash_obj["algorithm"] == "sha256" and hash_obj["value"] == digest.hex())


def _digest_is(hash_obj: Any, digest: bytes) -> bool:
    return bool(hash_obj["algorithm"] == "SHA2_256" and _b64(hash_obj["digest"]) == digest)


def _b64(text: Any) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        return b""


def from_cosign_annotation(text: str) -> LogEntry:
    """Parse the legacy ``dev.sigstore.cosign/bundle`` annotation."""
    try:
        doc = json_object(text, "cosign bundle annotation")
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


def from_bundle_entry(entry: Any) -> LogEntry:
    """Parse one ``tlogEntries`` item (with a SET, an inclusion proof, or both)."""
    try:
        promise = entry.get("inclusionPromise") or {}
        set_text = promise.get("signedEntryTimestamp")
        return LogEntry(
            body=_protobuf_bytes(entry["canonicalizedBody"]),
            integrated_time=_integer(entry.get("integratedTime") or 0),
            log_index=_integer(entry.get("logIndex") or 0),
            log_id=_protobuf_bytes(entry["logId"]["keyId"]).hex(),
            signed_entry_timestamp=_protobuf_bytes(set_text) if set_text else None,
            proof=_proof(entry.get("inclusionProof")),
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise SignatureInvalid(f"malformed transparency log entry: {exc}") from exc


def _proof(doc: Any) -> InclusionProof | None:
    if not doc:
        return None
    return InclusionProof(
        log_index=_integer(doc.get("logIndex") or 0),
        tree_size=_integer(doc["treeSize"]),
        root_hash=_protobuf_bytes(doc["rootHash"]),
        hashes=tuple(_protobuf_bytes(h) for h in doc.get("hashes") or []),
        checkpoint=str(doc["checkpoint"]["envelope"]),
    )


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


def signers_of(der_items: Collection[bytes]) -> frozenset[bytes]:
    return frozenset(d for d in der_items if d)
