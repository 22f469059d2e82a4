"""Fulcio signing certificates: the chain to a trusted certificate authority at the
verified signing time, the embedded SCT, and the identity the certificate names.

Fulcio certificates live ten minutes, so every time check uses a *verified* signing time
(a transparency-log integrated time under a valid SET, or an RFC 3161 timestamp), never
the clock: https://github.com/sigstore/fulcio/blob/main/docs/how-certificate-issuing-works.md

The chain is the trusted root's: the CA's ``certChain`` lists the intermediates and the
root, so certificates a signature object carries beside the leaf (cosign's
``dev.sigstore.cosign/chain``) are never trusted, only the leaf is.

SCT (RFC 6962 §3.2): the CT log signs ``version, signature_type, timestamp, entry_type=
precert_entry, issuer_key_hash, TBSCertificate (without the SCT list), extensions``.

Identity: the subject is the SAN (URI or email), the OIDC issuer the Fulcio extension
1.3.6.1.4.1.57264.1.8 (DER UTF8String) or its deprecated predecessor .1.1 (raw string);
GitHub Actions claims follow in .1.9 onwards
(https://github.com/sigstore/fulcio/blob/main/docs/oid-info.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.errors import KeyUnsupported
from proxy.trust.keys import VerifyingKey, from_public_key
from proxy.trust.trustroot import Authority, TrustedRoot

_FULCIO = "1.3.6.1.4.1.57264.1."
ISSUER_V1 = _FULCIO + "1"
ISSUER_V2 = _FULCIO + "8"
# Fulcio's extension names (its certificate.Extensions JSON names), by OID suffix.
EXTENSIONS: Mapping[str, int] = MappingProxyType(
    {
        "githubWorkflowTrigger": 2,
        "githubWorkflowSha": 3,
        "githubWorkflowName": 4,
        "githubWorkflowRepository": 5,
        "githubWorkflowRef": 6,
        "buildSignerURI": 9,
        "buildSignerDigest": 10,
        "runnerEnvironment": 11,
        "sourceRepositoryURI": 12,
        "sourceRepositoryDigest": 13,
        "sourceRepositoryRef": 14,
        "sourceRepositoryIdentifier": 15,
        "sourceRepositoryOwnerURI": 16,
        "sourceRepositoryOwnerIdentifier": 17,
        "buildConfigURI": 18,
        "buildConfigDigest": 19,
        "buildTrigger": 20,
        "runInvocationURI": 21,
        "sourceRepositoryVisibilityAtSigning": 22,
        "deploymentEnvironment": 23,
    }
)
_LEGACY_RAW = range(1, 7)  # .1.1-.1.6 hold the raw string, .1.8 onwards a DER UTF8String


class CertificateProblem(Exception):
    """Why a certificate cannot vouch for a signature; ``kind`` picks the reason."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "untrusted" | "expired" | "sct"
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """Who a Fulcio certificate says signed: SAN, OIDC issuer, and the other claims."""

    subject: str
    issuer: str
    extensions: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.subject} (issuer {self.issuer or 'none'})"


def load_certificate(data: bytes) -> x509.Certificate:
    """PEM or DER; ``ValueError`` when it is neither."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def signing_key(cert: x509.Certificate) -> VerifyingKey:
    try:
        return from_public_key(cert.public_key(), name="signing certificate")
    except KeyUnsupported as exc:
        raise CertificateProblem("untrusted", exc.message) from exc


def identity(cert: x509.Certificate) -> CertIdentity:
    return CertIdentity(_subject(cert), _issuer(cert), MappingProxyType(_claims(cert)))


def verify_chain(cert: x509.Certificate, root: TrustedRoot, times: tuple[datetime, ...]) -> None:
    """The leaf chains to a CA of ``root`` valid at every verified time, is itself valid
    then, and is a code-signing certificate. Raises ``CertificateProblem``."""
    for when in times:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise CertificateProblem(
                "expired",
                f"certificate valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to"
                f" {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at the signing time {when:%Y-%m-%dT%H:%M:%SZ}",
            )
    _leaf_usage(cert)
    problems = []
    for authority in root.certificate_authorities:
        problem = _chains_to(cert, authority, times)
        if problem is None:
            return
        problems.append(problem)
    raise CertificateProblem("untrusted", f"certificate does not chain to a CA of {root.name}: {'; '.join(problems)}")


def _leaf_usage(cert: x509.Certificate) -> None:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value if _has_bc(cert) else None
    except x509.ExtensionNotFound as exc:
        raise CertificateProblem("untrusted", f"signing certificate lacks {exc.oid.dotted_string}") from exc
    if not usage.digital_signature or ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise CertificateProblem("untrusted", "not a code-signing certificate")
    if constraints is not None and constraints.ca:
        raise CertificateProblem("untrusted", "signing certificate is a CA certificate")


def _has_bc(cert: x509.Certificate) -> bool:
    return any(e.oid == x509.oid.ExtensionOID.BASIC_CONSTRAINTS for e in cert.extensions)


def _chains_to(cert: x509.Certificate, authority: Authority, times: tuple[datetime, ...]) -> str | None:
    """None when ``cert`` is issued by the authority's chain and all of it is valid then."""
    if not all(authority.window.contains(t) for t in times):
        return f"{authority.uri or 'CA'} not valid at the signing time"
    child = cert
    for issuer in authority.chain:
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return f"not issued by {issuer.subject.rfc4514_string()}"
        if not _is_ca(issuer):
            return f"{issuer.subject.rfc4514_string()} is not a CA"
        if not all(issuer.not_valid_before_utc <= t <= issuer.not_valid_after_utc for t in times):
            return f"{issuer.subject.rfc4514_string()} not valid at the signing time"
        child = issuer
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def verify_sct(cert: x509.Certificate, root: TrustedRoot) -> None:
    """At least one embedded SCT is signed by a CT log of ``root`` over this certificate."""
    if not root.ctlogs:
        return  # a private deployment without CT: nothing to check against
    try:
        scts = cert.extensions.get_extension_for_class(x509.PrecertificateSignedCertificateTimestamps).value
    except x509.ExtensionNotFound as exc:
        raise CertificateProblem("sct", "certificate has no embedded SCT") from exc
    issuer = _issuer_of(cert, root)
    if issuer is None:
        raise CertificateProblem("sct", "no trusted issuer to check the SCT against")
    issuer_hash = hashlib.sha256(
        issuer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).digest()
    tbs = cert.tbs_precertificate_bytes
    for sct in scts:
        log = root.ctlogs.get(sct.log_id)
        if log is None:
            continue
        stamped = sct.timestamp.replace(tzinfo=UTC)  # cryptography gives naive UTC
        millis = int(stamped.timestamp() * 1000)
        signed = (
            struct.pack(">BBQH", 0, 0, millis, 1)
            + issuer_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + len(sct.extension_bytes).to_bytes(2, "big")
            + sct.extension_bytes
        )
        if log.key.verify(sct.signature, signed) and log.window.contains(stamped):
            return
    raise CertificateProblem("sct", "no embedded SCT is signed by a trusted CT log")


def _issuer_of(cert: x509.Certificate, root: TrustedRoot) -> x509.Certificate | None:
    for authority in root.certificate_authorities:
        issuer = authority.chain[0]
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return issuer
    return None


def _subject(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    for kind in (x509.UniformResourceIdentifier, x509.RFC822Name, x509.DNSName):
        names = san.get_values_for_type(kind)
        if names:
            return str(names[0])
    for other in san.get_values_for_type(x509.OtherName):
        return _der_utf8(other.value) or ""
    return ""


def _issuer(cert: x509.Certificate) -> str:
    v2 = _extension(cert, ISSUER_V2)
    if v2 is not None:
        return _der_utf8(v2) or ""
    v1 = _extension(cert, ISSUER_V1)
    return v1.decode(errors="replace") if v1 is not None else ""


def _claims(cert: x509.Certificate) -> dict[str, str]:
    found = {}
    for name, number in EXTENSIONS.items():
        raw = _extension(cert, f"{_FULCIO}{number}")
        if raw is None:
            continue
        value = raw.decode(errors="replace") if number in _LEGACY_RAW else _der_utf8(raw)
        if value is not None:
            found[name] = value
    return found


def _extension(cert: x509.Certificate, oid: str) -> bytes | None:
    for ext in cert.extensions:
        if ext.oid.dotted_string == oid and isinstance(ext.value, x509.UnrecognizedExtension):
            return ext.value.value
    return None


def _der_utf8(raw: bytes) -> str | None:
    """The text of a DER UTF8String (tag 12); None when ``raw`` is something else."""
    if len(raw) < 2 or raw[0] != 0x0C:
        return None
    length, offset = raw[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, offset = int.from_bytes(raw[2 : 2 + count], "big"), 2 + count
    if offset + length != len(raw):
        return None
    return raw[offset:].decode(errors="replace")
