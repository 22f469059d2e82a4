"""Public keys that verify cosign signatures: loading PEM (SPKI) and checking signatures.

A cosign signature carries no algorithm identifier; the verifier knows it from the key
(https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md). So the key type
decides: ECDSA P-256/P-384/P-521 with SHA-256/384/512 over DER signatures, RSA (>= 2048
bits) with SHA-256 in PKCS#1 v1.5 and then PSS (either may have been used), and Ed25519
over the message itself. Anything else is refused when the key is loaded, not when an
image is checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from proxy.errors import KeyUnsupported

VerifierKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_CURVE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    """A public key accepted for cosign verification, with its algorithm fixed at load."""

    key: VerifierKey
    algorithm: str  # e.g. "ecdsa-p256-sha256", "rsa-4096-sha256", "ed25519"
    key_id: str = field(repr=False)  # sha256 hex of the DER SPKI (Rekor's logID for log keys)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is a valid signature of ``data`` by this key."""
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                algorithm = _CURVE_HASHES[self.key.curve.name]()
                self.key.verify(signature, data, ec.ECDSA(algorithm))
            elif isinstance(self.key, rsa.RSAPublicKey):
                return _verify_rsa(self.key, signature, data)
            else:
                self.key.verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify_digest(self, signature: bytes, sha256: bytes) -> bool:
        """True when ``signature`` signs the message whose SHA-256 is ``sha256`` (Sigstore
        message-signature bundles carry only the digest). Ed25519 signs messages, not
        digests, so it cannot verify these."""
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                if self.key.curve.name != "secp256r1":
                    return False
                self.key.verify(signature, sha256, ec.ECDSA(Prehashed(hashes.SHA256())))
            elif isinstance(self.key, rsa.RSAPublicKey):
                return _verify_rsa_prehashed(self.key, signature, sha256)
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


def _verify_rsa_prehashed(key: rsa.RSAPublicKey, signature: bytes, digest: bytes) -> bool:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    for scheme in (padding.PKCS1v15(), pss):
        try:
            key.verify(signature, digest, scheme, Prehashed(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            continue
        return True
    return False


def _verify_rsa(key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    for scheme in (padding.PKCS1v15(), pss):
        try:
            key.verify(signature, data, scheme, hashes.SHA256())
        except (InvalidSignature, ValueError):
            continue
        return True
    return False


def load_public_key(pem: bytes | str, *, name: str = "key") -> VerifyingKey:
    """Load a PEM ``PUBLIC KEY`` (SPKI); ``name`` appears in the error for a bad key."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN PUBLIC KEY-----" not in data:
        raise KeyUnsupported(f"{name}: not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyUnsupported(f"{name}: unreadable public key: {exc}") from exc
    return from_public_key(key, name=name)


def load_der_public_key(der: bytes, *, name: str = "key") -> VerifyingKey:
    """Load a DER SPKI key (as ``trusted_root.json`` and certificates carry them)."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyUnsupported(f"{name}: unreadable public key: {exc}") from exc
    return from_public_key(key, name=name)


def from_public_key(key: object, *, name: str = "key") -> VerifyingKey:
    """A ``VerifyingKey`` for a key object (e.g. a certificate's), refusing unsupported types."""
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise KeyUnsupported(f"{name}: unsupported key type {type(key).__name__.lstrip('_')}")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return VerifyingKey(key, _algorithm(key, name), hashlib.sha256(der).hexdigest())


def _algorithm(key: VerifierKey, name: str) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        hash_type = _CURVE_HASHES.get(key.curve.name)
        if hash_type is None:
            raise KeyUnsupported(f"{name}: unsupported elliptic curve {key.curve.name}")
        return f"ecdsa-p{key.curve.key_size}-{hash_type.name}"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise KeyUnsupported(f"{name}: RSA key of {key.key_size} bits (need >= 2048)")
        return f"rsa-{key.key_size}-sha256"
    return "ed25519"
