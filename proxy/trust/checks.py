"""The checks one signature object goes through, pure and synchronous (callers run them off
the event loop): with a public key (``check``) or keyless against a trust root
(``check_keyless``). Each answers with the furthest step that failed (``Reason`` order) or
with what the object proved: the certificate identity, the in-toto statement and the
verified signing time.

Order, as cosign and sigstore-go verify:
1. content: a signature is a simple-signing payload or a statement with the cosign sign
   predicate; an attestation a statement with the wanted predicate type;
2. the signature over the payload (DSSE: over its pre-authentication encoding; message
   signatures: over the artifact digest) by the key or the certificate's key;
3. the payload names one of the digests being admitted;
4. transparency log: an entry of a trusted log, proven by its SET or by an inclusion proof
   up to a signed checkpoint, recording this signature over this content by this signer;
   RFC 3161 timestamps by a trusted authority. SET integrated times and timestamps are
   the verified signing times (keyless needs at least one);
5. keyless only: the certificate chains to a trusted Fulcio CA and is valid at every
   verified signing time (never "now": certificates live ten minutes), with a valid SCT.
Identity matching against the policy is the caller's (``proxy.trust.identity``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.errors import DigestInvalid, SignatureInvalid
from proxy.oci.digest import Digest
from proxy.trust import certificates, timestamps
from proxy.trust.certificates import CertIdentity, CertificateProblem
from proxy.trust.cosign import (
    INTOTO_PAYLOAD_TYPE,
    REASON_RANK,
    SIGN_PREDICATE,
    SIMPLESIGNING_TYPE,
    BundleSignature,
    Reason,
    Signature,
    SimpleSignature,
    pae,
    statement,
    subject_digests,
)
from proxy.trust.documents import json_object
from proxy.trust.keys import VerifyingKey
from proxy.trust.rekor import LogEntry, Signed
from proxy.trust.trustroot import LogKey, TrustedRoot, Window

_CERT_REASONS = {
    "untrusted": Reason.UNTRUSTED_CERTIFICATE,
    "expired": Reason.CERT_NOT_VALID_AT_TIME,
    "sct": Reason.BAD_SCT,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    reason: Reason | None  # None: verified
    detail: str = ""
    identity: CertIdentity | None = None  # keyless: who the certificate names
    statement: Mapping[str, Any] | None = None  # DSSE: the in-toto statement
    signed_at: datetime | None = None  # the earliest verified signing time, if any

    def better_than(self, other: Outcome) -> bool:
        """Does this failure say more than ``other`` (a later step failed)?"""
        return REASON_RANK[self.reason or Reason.NO_SIGNATURE] > REASON_RANK[other.reason or Reason.NO_SIGNATURE]


@dataclass(frozen=True, slots=True)
class Purpose:
    """What the object must be: a signature (``predicate_type`` None) or an attestation."""

    predicate_type: str | None = None


SIGNATURE = Purpose()


@dataclass(frozen=True, slots=True)
class LogKeys:
    """The transparency logs whose entries count, by hex log id."""

    logs: Mapping[str, LogKey] = field(default_factory=dict)

    @classmethod
    def of_key(cls, key: VerifyingKey) -> LogKeys:
        return cls(MappingProxyType({key.key_id: LogKey(bytes.fromhex(key.key_id), key, Window(None, None), "")}))

    @classmethod
    def of_root(cls, root: TrustedRoot) -> LogKeys:
        return cls(MappingProxyType({log_id.hex(): log for log_id, log in root.tlogs.items()}))


def check(
    sig: Signature,
    key: VerifyingKey,
    digests: Collection[Digest],
    log_key: VerifyingKey | None,
    purpose: Purpose = SIGNATURE,
    root: TrustedRoot | None = None,
) -> Outcome:
    """Does ``sig`` verify with ``key`` for one of ``digests``? With ``log_key``, it must
    also be in that log; with ``root``, its timestamps are checked too."""
    content = _content(sig, digests, purpose)
    if isinstance(content, Outcome):
        return content
    good = _good_signatures(sig, key)
    if not good:
        return Outcome(Reason.BAD_SIGNATURE, f"{sig.origin}: not signed by this key")
    named = _names(sig, content, digests)
    if named is not None:
        return named
    der = key.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    signed_at = None
    if log_key is not None:
        logged = _log(sig, good, LogKeys.of_key(log_key), frozenset({der}))
        if isinstance(logged, Outcome):
            return logged
        signed_at = min(logged, default=None)
    if root is not None:
        stamped = _timestamps(sig, good, root)
        if isinstance(stamped, Outcome):
            return stamped
        signed_at = min([*stamped, *([signed_at] if signed_at else [])], default=None)
    return Outcome(None, sig.origin, None, content, signed_at)


def check_keyless(
    sig: Signature, root: TrustedRoot, digests: Collection[Digest], purpose: Purpose = SIGNATURE
) -> Outcome:
    """Does ``sig`` carry a Fulcio certificate of ``root`` that signed it for one of
    ``digests``, logged and timestamped? On success the outcome names the identity."""
    if sig.certificate is None:
        return Outcome(Reason.NO_SIGNATURE, f"{sig.origin}: signed with a key, not a certificate")
    content = _content(sig, digests, purpose)
    if isinstance(content, Outcome):
        return content
    try:
        cert = certificates.load_certificate(sig.certificate)
        key = certificates.signing_key(cert)
    except (ValueError, CertificateProblem) as exc:
        return Outcome(Reason.UNTRUSTED_CERTIFICATE, f"{sig.origin}: unusable certificate: {exc}")
    good = _good_signatures(sig, key)
    if not good:
        return Outcome(Reason.BAD_SIGNATURE, f"{sig.origin}: not signed by its certificate's key")
    named = _names(sig, content, digests)
    if named is not None:
        return named
    times = _log(sig, good, LogKeys.of_root(root), frozenset({cert.public_bytes(serialization.Encoding.DER)}))
    if isinstance(times, Outcome):
        return times
    stamped = _timestamps(sig, good, root)
    if isinstance(stamped, Outcome):
        return stamped
    verified = tuple(sorted({*times, *stamped}))
    if not verified:
        return Outcome(Reason.NOT_IN_TLOG, f"{sig.origin}: no verified signing time (no SET, no timestamp)")
    return _certificate(sig, cert, root, verified, content)


def _certificate(
    sig: Signature, cert: x509.Certificate, root: TrustedRoot, times: tuple[datetime, ...], content: Any
) -> Outcome:
    try:
        certificates.verify_chain(cert, root, times)
        certificates.verify_sct(cert, root)
    except CertificateProblem as exc:
        return Outcome(_CERT_REASONS[exc.kind], f"{sig.origin}: {exc.detail}")
    return Outcome(None, sig.origin, certificates.identity(cert), content, times[0])


def _content(sig: Signature, digests: Collection[Digest], purpose: Purpose) -> Outcome | dict[str, Any] | None:
    """Step 1 for DSSE envelopes: the statement, if the predicate is the one wanted."""
    if isinstance(sig, SimpleSignature):
        if purpose.predicate_type is not None:
            return Outcome(Reason.WRONG_PREDICATE, f"{sig.origin}: a signature, not an attestation")
        return None
    if sig.message_digest is not None:
        if purpose.predicate_type is not None:
            return Outcome(Reason.WRONG_PREDICATE, f"{sig.origin}: a message signature, not an attestation")
        return None
    doc = statement(sig.payload_type, sig.payload)
    wanted = purpose.predicate_type or SIGN_PREDICATE
    if doc is not None and doc.get("predicateType") != wanted:
        # An attestation (SBOM, provenance) is not a signature, nor another attestation.
        found = doc.get("predicateType")
        return Outcome(Reason.WRONG_PREDICATE, f"{sig.origin}: predicate type {found!r}, wanted {wanted!r}")
    return doc


def _good_signatures(sig: Signature, key: VerifyingKey) -> tuple[bytes, ...]:
    if isinstance(sig, SimpleSignature):
        return (sig.signature,) if key.verify(sig.signature, sig.payload) else ()
    if sig.message_digest is not None:
        return tuple(s for s in sig.signatures if key.verify_digest(s, sig.message_digest))
    message = pae(sig.payload_type, sig.payload)
    return tuple(s for s in sig.signatures if key.verify(s, message))


def _names(sig: Signature, content: dict[str, Any] | None, digests: Collection[Digest]) -> Outcome | None:
    """Step 3: None when the signed content names one of ``digests``."""
    if isinstance(sig, SimpleSignature):
        try:
            critical = json_object(sig.payload, "payload")["critical"]
            named, kind = critical["image"]["docker-manifest-digest"], critical["type"]
        except (SignatureInvalid, KeyError, TypeError) as exc:
            return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: malformed payload: {exc}")
        if kind != SIMPLESIGNING_TYPE:
            return Outcome(Reason.NO_SIGNATURE, f"{sig.origin}: payload type {kind!r}")
        if not _names_candidate(named, digests):
            return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: payload names {named}")
        return None
    if sig.message_digest is not None:
        named = f"sha256:{sig.message_digest.hex()}"
        if _names_candidate(named, digests):
            return None
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: signs {named}")
    if content is None or sig.payload_type != INTOTO_PAYLOAD_TYPE:
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: payload is not an in-toto statement")
    subjects = subject_digests(content)
    if not any(_names_candidate(d, digests) for d in subjects):
        return Outcome(Reason.DIGEST_MISMATCH, f"{sig.origin}: statement names {subjects}")
    return None


def _signed(sig: Signature, signature: bytes, signers: frozenset[bytes]) -> Signed:
    if isinstance(sig, SimpleSignature):
        digest = hashlib.sha256(sig.payload).digest()
        return Signed(signature, digest, digest, signers)
    if sig.message_digest is not None:
        return Signed(signature, sig.message_digest, sig.message_digest, signers)
    message = hashlib.sha256(pae(sig.payload_type, sig.payload)).digest()
    return Signed(signature, message, hashlib.sha256(sig.payload).digest(), signers)


def _entries(sig: Signature) -> tuple[LogEntry, ...]:
    if isinstance(sig, SimpleSignature):
        return (sig.log_entry,) if sig.log_entry is not None else ()
    return sig.log_entries


def _log(sig: Signature, good: tuple[bytes, ...], logs: LogKeys, signers: frozenset[bytes]) -> Outcome | list[datetime]:
    """Step 4: the SET integrated times of the entries that prove this signature logged."""
    best = Outcome(Reason.NOT_IN_TLOG, f"{sig.origin}: no transparency log entry")
    proven, times = False, []
    for entry in _entries(sig):
        failure = _entry_failure(entry, logs, [_signed(sig, s, signers) for s in good])
        if failure is not None:
            outcome = Outcome(failure[0], f"{sig.origin}: {failure[1]}")
            best = outcome if outcome.better_than(best) else best
            continue
        proven = True
        if entry.signed_entry_timestamp is not None:
            times.append(datetime.fromtimestamp(entry.integrated_time, UTC))
    return times if proven else best


def _entry_failure(entry: LogEntry, logs: LogKeys, signed: list[Signed]) -> tuple[Reason, str] | None:
    log = logs.logs.get(entry.log_id)
    if log is None:
        return Reason.UNTRUSTED_LOG, f"log entry from an unknown log (log id {entry.log_id[:16]}…)"
    if entry.signed_entry_timestamp is not None:
        if not entry.verify_set(log.key):
            return Reason.UNTRUSTED_LOG, "log promise (SET) not signed by the log key"
        if not log.window.contains(datetime.fromtimestamp(entry.integrated_time, UTC)):
            return Reason.UNTRUSTED_LOG, "log entry integrated outside the log key's validity"
    if entry.proof is not None:
        problem = entry.verify_proof(log.key)
        if problem is not None:
            return Reason.BAD_INCLUSION_PROOF, problem
    elif entry.signed_entry_timestamp is None:
        return Reason.NOT_IN_TLOG, "log entry has neither a SET nor an inclusion proof"
    if not any(entry.covers(s) for s in signed):
        return Reason.LOG_ENTRY_MISMATCH, "log entry records another signature, artifact or signer"
    return None


def _timestamps(sig: Signature, good: tuple[bytes, ...], root: TrustedRoot) -> Outcome | list[datetime]:
    times = []
    for data in sig.timestamps:
        try:
            times.append(timestamps.verify(data, good[0], root))
        except timestamps.TimestampInvalid as exc:
            return Outcome(Reason.BAD_TIMESTAMP, f"{sig.origin}: {exc}")
    return times


def _names_candidate(named: Any, digests: Collection[Digest]) -> bool:
    try:
        return Digest.parse(named if isinstance(named, str) else "") in digests
    except DigestInvalid:
        return False


__all__ = ["SIGNATURE", "BundleSignature", "LogKeys", "Outcome", "Purpose", "check", "check_keyless"]
