"""RFC 3161 signed timestamps, checked against the timestamp authorities of a trust root.

A Sigstore bundle may carry ``timestampVerificationData.rfc3161Timestamps[].signedTimestamp``
(a DER ``TimeStampResp``), legacy cosign the ``dev.sigstore.cosign/rfc3161timestamp``
annotation (``{"SignedRFC3161Timestamp": base64}``). The token is CMS ``SignedData``
(RFC 5652) over a ``TSTInfo`` whose ``messageImprint`` is the hash of the artifact
signature. Verified: the signer's ``messageDigest`` attribute is the hash of the
``TSTInfo``, the signature over the signed attributes is by the authority's leaf
certificate, that chain is valid at ``genTime``, the authority's window contains it, and
the imprint is the signature's hash. Only then is ``genTime`` a verified signing time.

Parsed with a small DER reader: the structures are fixed and a general ASN.1 library would
be a dependency for a hundred lines.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from proxy.trust.trustroot import Authority, TrustedRoot

_SIGNED_DATA = "1.2.840.113549.1.7.2"
_TST_INFO = "1.2.840.113549.1.9.16.1.4"
_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_HASHES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "2.16.840.1.101.3.4.2.1": ("sha256", hashes.SHA256),
    "2.16.840.1.101.3.4.2.2": ("sha384", hashes.SHA384),
    "2.16.840.1.101.3.4.2.3": ("sha512", hashes.SHA512),
}


class TimestampInvalid(ValueError):
    """A timestamp that is malformed or does not verify; the message says which."""


@dataclass(frozen=True, slots=True)
class Tlv:
    tag: int
    content: bytes
    raw: bytes  # the whole encoding, tag and length included


def read(data: bytes, offset: int = 0) -> tuple[Tlv, int]:
    """One DER element at ``offset`` and the offset after it."""
    if offset + 2 > len(data):
        raise TimestampInvalid("truncated DER")
    tag, length, pos = data[offset], data[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise TimestampInvalid("bad DER length")
        length, pos = int.from_bytes(data[pos : pos + count], "big"), pos + count
    end = pos + length
    if end > len(data):
        raise TimestampInvalid("truncated DER")
    return Tlv(tag, data[pos:end], data[offset:end]), end


def children(content: bytes) -> list[Tlv]:
    items, offset = [], 0
    while offset < len(content):
        item, offset = read(content, offset)
        items.append(item)
    return items


def oid(tlv: Tlv) -> str:
    if tlv.tag != 0x06 or not tlv.content:
        raise TimestampInvalid("expected an OBJECT IDENTIFIER")
    first = tlv.content[0]
    parts, value = [str(min(first // 40, 2)), str(first - 40 * min(first // 40, 2))], 0
    for byte in tlv.content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(str(value))
            value = 0
    return ".".join(parts)


@dataclass(frozen=True, slots=True)
class Token:
    signed_attrs: bytes  # DER of the signed attributes, re-tagged as a SET (what is signed)
    signature: bytes
    digest_oid: str
    message_digest: bytes
    tst_info: bytes
    imprint_oid: str
    imprint: bytes
    gen_time: datetime
    certificates: tuple[x509.Certificate, ...]


def parse(data: bytes) -> Token:
    """A ``TimeStampResp`` or a bare ``TimeStampToken`` (ContentInfo)."""
    top, _ = read(data)
    parts = children(top.content)
    if parts and parts[0].tag == 0x30 and (not parts[0].content or parts[0].content[0] == 0x02):
        if parts[0].content[:3] not in (b"\x02\x01\x00", b"\x02\x01\x01"):  # granted / withMods
            raise TimestampInvalid("timestamp response status is not granted")
        if len(parts) < 2:
            raise TimestampInvalid("timestamp response has no token")
        parts = children(parts[1].content)
    if len(parts) < 2 or oid(parts[0]) != _SIGNED_DATA:
        raise TimestampInvalid("timestamp token is not CMS SignedData")
    signed_data = children(children(parts[1].content)[0].content)
    encap = children(signed_data[2].content)
    if oid(encap[0]) != _TST_INFO:
        raise TimestampInvalid("timestamp token does not hold a TSTInfo")
    tst_info = read(encap[1].content)[0].content  # [0] EXPLICIT OCTET STRING
    certs = tuple(
        x509.load_der_x509_certificate(c.raw) for t in signed_data[3:-1] if t.tag == 0xA0 for c in children(t.content)
    )
    signer = children(children(signed_data[-1].content)[0].content)
    return _token(signer, tst_info, certs)


def _token(signer: list[Tlv], tst_info: bytes, certs: tuple[x509.Certificate, ...]) -> Token:
    digest_oid = oid(children(signer[2].content)[0])
    attrs = signer[3]
    if attrs.tag != 0xA0:
        raise TimestampInvalid("timestamp signer has no signed attributes")
    message_digest = b""
    for attr in children(attrs.content):
        kind, values = children(attr.content)
        if oid(kind) == _MESSAGE_DIGEST:
            message_digest = children(values.content)[0].content
    info = children(read(tst_info)[0].content)
    imprint = children(info[2].content)
    return Token(
        signed_attrs=b"\x31" + attrs.raw[1:],
        signature=signer[5].content,
        digest_oid=digest_oid,
        message_digest=message_digest,
        tst_info=tst_info,
        imprint_oid=oid(children(imprint[0].content)[0]),
        imprint=imprint[1].content,
        gen_time=_generalized_time(info[4]),
        certificates=certs,
    )


def _generalized_time(tlv: Tlv) -> datetime:
    text = tlv.content.decode("ascii", errors="replace")
    if tlv.tag != 0x18 or not text.endswith("Z"):
        raise TimestampInvalid("genTime is not a UTC GeneralizedTime")
    whole = text[:-1].split(".")[0]
    try:
        return datetime.strptime(whole, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError as exc:
        raise TimestampInvalid(f"genTime {text!r} unreadable") from exc


def verify(data: bytes, signature: bytes, root: TrustedRoot) -> datetime:
    """The verified time ``data`` (a timestamp response) gives ``signature``; raises
    ``TimestampInvalid`` saying why not."""
    try:
        token = parse(data)
    except (IndexError, ValueError) as exc:
        raise TimestampInvalid(f"malformed RFC 3161 timestamp: {exc}") from exc
    imprint_hash = _HASHES.get(token.imprint_oid)
    if imprint_hash is None or hashlib.new(imprint_hash[0], signature).digest() != token.imprint:
        raise TimestampInvalid("timestamp is for another signature")
    digest_hash = _HASHES.get(token.digest_oid)
    if digest_hash is None or hashlib.new(digest_hash[0], token.tst_info).digest() != token.message_digest:
        raise TimestampInvalid("timestamp signed attributes do not match its TSTInfo")
    for authority in root.timestamp_authorities:
        if _signed_by(authority, token, digest_hash[1]):
            return token.gen_time
    raise TimestampInvalid(f"timestamp not signed by a timestamp authority of {root.name}")


def _signed_by(authority: Authority, token: Token, digest: type[hashes.HashAlgorithm]) -> bool:
    when = token.gen_time
    if not authority.window.contains(when):
        return False
    leaf = authority.chain[0]
    key = leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(token.signature, token.signed_attrs, ec.ECDSA(digest()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(token.signature, token.signed_attrs, padding.PKCS1v15(), digest())
        else:
            return False
    except InvalidSignature:
        return False
    chain = authority.chain
    for child, issuer in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return False
    return all(c.not_valid_before_utc <= when <= c.not_valid_after_utc for c in chain)
