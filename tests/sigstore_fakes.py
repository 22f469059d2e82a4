"""A private Sigstore for tests: a Fulcio-like CA issuing ten-minute certificates with
identity extensions and embedded SCTs, a Rekor v1 log (SETs, inclusion proofs, signed
checkpoints over a real Merkle tree), a Rekor v2 log (Ed25519 checkpoints, no SET), an
RFC 3161 timestamp authority, and the ``trusted_root.json`` that trusts them.

Everything is what the real services write (checked by verifying the real public-good
vectors with the same code in ``tests/test_keyless_vectors.py``); the keys are ours, so
tests can make the failures the real vectors cannot show (a certificate outside its
validity at the integrated time, an identity extension, a Rekor v2 entry).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.trust.cosign import INTOTO_PAYLOAD_TYPE, SIGN_PREDICATE, pae
from tests.signer import STATEMENT_V1, SimpleSigningLayer, simple_signing_payload

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
GITHUB = "https://token.actions.githubusercontent.com"
WORKFLOW = "https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1.0.0"
_FULCIO = "1.3.6.1.4.1.57264.1."
_EXTENSION_OIDS = {
    "buildSignerURI": 9, "runnerEnvironment": 11, "sourceRepositoryURI": 12, "sourceRepositoryRef": 14,
    "sourceRepositoryOwnerURI": 16, "buildTrigger": 20, "githubWorkflowRepository": 5,
}  # fmt: skip
_SCT_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --- DER, just enough for RFC 3161 ------------------------------------------------------
def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.insert(0, 0x80 | (value & 0x7F))
            value >>= 7
        body += bytes(chunk)
    return tlv(0x06, body)


def der_int(value: int) -> bytes:
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def utf8(text: str) -> bytes:
    return tlv(0x0C, text.encode())


# --- Merkle tree (RFC 6962 §2.1) --------------------------------------------------------
def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return _node(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def audit_path(index: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if index < k:
        return [*audit_path(index, leaves[:k]), merkle_root(leaves[k:])]
    return [*audit_path(index - k, leaves[k:]), merkle_root(leaves[:k])]


@dataclass
class Log:
    """A transparency log (v1: ECDSA with SETs; v2: Ed25519, proofs only)."""

    version: int
    origin: str
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    leaves: list[bytes] = field(default_factory=lambda: [hashlib.sha256(b"\x00seed%d" % i).digest() for i in range(5)])

    @property
    def spki(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def log_id(self) -> bytes:
        return hashlib.sha256(self.spki).digest()

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(data)

    def entry(
        self, body: bytes, integrated_time: int, *, with_set: bool = True, with_proof: bool = True
    ) -> dict[str, Any]:
        """A ``tlogEntries`` item for a new entry ``body`` (protobuf JSON)."""
        index = len(self.leaves)
        self.leaves.append(hashlib.sha256(b"\x00" + body).digest())
        self.leaves.append(hashlib.sha256(b"\x00after").digest())  # the tree grew since
        kind = json.loads(body)
        entry: dict[str, Any] = {
            "logIndex": str(index),
            "logId": {"keyId": b64(self.log_id)},
            "kindVersion": {"kind": kind["kind"], "version": kind["apiVersion"]},
            "integratedTime": str(integrated_time if self.version == 1 else 0),
            "canonicalizedBody": b64(body),
        }
        if with_set and self.version == 1:
            promise = {
                "body": b64(body),
                "integratedTime": integrated_time,
                "logID": self.log_id.hex(),
                "logIndex": index,
            }
            canonical = json.dumps(promise, sort_keys=True, separators=(",", ":")).encode()
            entry["inclusionPromise"] = {"signedEntryTimestamp": b64(self.sign(canonical))}
        if with_proof:
            entry["inclusionProof"] = self.proof(index)
        return entry

    def proof(self, index: int) -> dict[str, Any]:
        root = merkle_root(self.leaves)
        text = f"{self.origin}\n{len(self.leaves)}\n{b64(root)}\n"
        name = self.origin.split(" ")[0]  # a note's key name has no spaces; the origin may
        note = f"{text}\n\u2014 {name} {b64(self.log_id[:4] + self.sign(text.encode()))}\n"
        return {
            "logIndex": str(index),
            "rootHash": b64(root),
            "treeSize": str(len(self.leaves)),
            "hashes": [b64(h) for h in audit_path(index, self.leaves)],
            "checkpoint": {"envelope": note},
        }


@dataclass(frozen=True)
class Signer:
    """A short-lived key and the certificate Fulcio issued for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


class FakeSigstore:
    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = _ca_cert("fake-sigstore", self.root_key, None, self.root_key)
        self.intermediate_key = ec.generate_private_key(ec.SECP384R1())
        self.intermediate = _ca_cert("fake-sigstore-intermediate", self.intermediate_key, self.root, self.root_key)
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor = Log(1, "rekor.fake.test - 1", ec.generate_private_key(ec.SECP256R1()))
        self.rekor2 = Log(2, "log2026.rekor.fake.test", ed25519.Ed25519PrivateKey.generate())
        self.tsa_root_key = ec.generate_private_key(ec.SECP384R1())
        self.tsa_root = _ca_cert("fake-tsa-root", self.tsa_root_key, None, self.tsa_root_key)
        self.tsa_key = ec.generate_private_key(ec.SECP256R1())
        self.tsa_leaf = _tsa_leaf(self.tsa_key, self.tsa_root, self.tsa_root_key)

    # --- Fulcio ---------------------------------------------------------------------------
    def issue(
        self,
        subject: str = WORKFLOW,
        issuer: str = GITHUB,
        extensions: Mapping[str, str] | None = None,
        *,
        not_before: datetime = T0,
        sct: bool = True,
    ) -> Signer:
        key = ec.generate_private_key(ec.SECP256R1())
        san: x509.GeneralName = (
            x509.RFC822Name(subject)
            if "@" in subject and "://" not in subject
            else x509.UniformResourceIdentifier(subject)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(minutes=10))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(_raw(_FULCIO + "8", utf8(issuer)), critical=False)
        )
        for name, value in (extensions or {}).items():
            builder = builder.add_extension(_raw(_FULCIO + str(_EXTENSION_OIDS[name]), utf8(value)), critical=False)
        precert = builder.sign(self.intermediate_key, hashes.SHA384())
        if sct:
            builder = builder.add_extension(_raw(_SCT_OID.dotted_string, self._sct_list(precert, not_before)), False)
        return Signer(key, builder.sign(self.intermediate_key, hashes.SHA384()))

    def _sct_list(self, precert: x509.Certificate, when: datetime) -> bytes:
        issuer_hash = hashlib.sha256(
            self.intermediate_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()
        tbs = precert.tbs_certificate_bytes
        millis = int(when.timestamp() * 1000)
        signed = struct.pack(">BBQH", 0, 0, millis, 1) + issuer_hash + len(tbs).to_bytes(3, "big") + tbs + b"\x00\x00"
        signature = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        ct_id = hashlib.sha256(_spki(self.ct_key.public_key())).digest()
        sct = (
            b"\x00" + ct_id + struct.pack(">Q", millis) + b"\x00\x00" + b"\x04\x03" + struct.pack(">H", len(signature))
        )
        sct += signature
        listed = struct.pack(">H", len(sct)) + sct
        return tlv(0x04, struct.pack(">H", len(listed)) + listed)

    # --- timestamp authority -----------------------------------------------------------------
    def timestamp(self, signature: bytes, when: datetime) -> bytes:
        """A DER ``TimeStampResp`` over ``signature`` at ``when`` (RFC 3161)."""
        sha256 = seq(der_oid("2.16.840.1.101.3.4.2.1"))
        tst_info = seq(
            der_int(1),
            der_oid("1.2.3.4.1"),
            seq(sha256, tlv(0x04, hashlib.sha256(signature).digest())),
            der_int(42),
            tlv(0x18, when.strftime("%Y%m%d%H%M%SZ").encode()),
        )
        attrs = [
            seq(der_oid("1.2.840.113549.1.9.3"), tlv(0x31, der_oid("1.2.840.113549.1.9.16.1.4"))),
            seq(der_oid("1.2.840.113549.1.9.4"), tlv(0x31, tlv(0x04, hashlib.sha256(tst_info).digest()))),
        ]
        signed_attrs = b"".join(attrs)
        sig = self.tsa_key.sign(tlv(0x31, signed_attrs), ec.ECDSA(hashes.SHA256()))
        issuer_serial = seq(self.tsa_leaf.issuer.public_bytes(), der_int(self.tsa_leaf.serial_number))
        signer_info = seq(
            der_int(1), issuer_serial, sha256, tlv(0xA0, signed_attrs), seq(der_oid("1.2.840.10045.4.3.2")),
            tlv(0x04, sig),
        )  # fmt: skip
        signed_data = seq(
            der_int(3),
            tlv(0x31, sha256),
            seq(der_oid("1.2.840.113549.1.9.16.1.4"), tlv(0xA0, tlv(0x04, tst_info))),
            tlv(0x31, signer_info),
        )
        token = seq(der_oid("1.2.840.113549.1.7.2"), tlv(0xA0, signed_data))
        return seq(seq(der_int(0)), token)

    # --- the trust root ---------------------------------------------------------------------
    def trusted_root(self, *, rekor_key: bytes | None = None, with_tsa: bool = True) -> dict[str, Any]:
        start = {"start": "2020-01-01T00:00:00Z"}

        def log(spki: bytes, details: str, url: str) -> dict[str, Any]:
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {"rawBytes": b64(spki), "keyDetails": details, "validFor": start},
                "logId": {"keyId": b64(hashlib.sha256(spki).digest())},
            }

        der = serialization.Encoding.DER
        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [
                log(rekor_key or self.rekor.spki, "PKIX_ECDSA_P256_SHA_256", "https://rekor.fake.test"),
                log(self.rekor2.spki, "PKIX_ED25519", "https://log2026.rekor.fake.test"),
            ],
            "certificateAuthorities": [
                {
                    "subject": {"organization": "fake", "commonName": "fake-sigstore"},
                    "uri": "https://fulcio.fake.test",
                    "certChain": {
                        "certificates": [{"rawBytes": b64(c.public_bytes(der))} for c in (self.intermediate, self.root)]
                    },
                    "validFor": start,
                }
            ],
            "ctlogs": [log(_spki(self.ct_key.public_key()), "PKIX_ECDSA_P256_SHA_256", "https://ctfe.fake.test")],
            "timestampAuthorities": [
                {
                    "subject": {"organization": "fake", "commonName": "fake-tsa"},
                    "uri": "https://tsa.fake.test",
                    "certChain": {
                        "certificates": [{"rawBytes": b64(c.public_bytes(der))} for c in (self.tsa_leaf, self.tsa_root)]
                    },
                    "validFor": start,
                }
            ]
            if with_tsa
            else [],
        }

    def write_trusted_root(self, path: Path, **kwargs: Any) -> Path:
        path.write_text(json.dumps(self.trusted_root(**kwargs)))
        return path

    # --- what cosign writes -----------------------------------------------------------------
    def legacy_layer(
        self, digest: str, reference: str, signer: Signer, *, integrated: datetime | None = None
    ) -> SimpleSigningLayer:
        """``cosign sign`` (v2, keyless): the payload, signature and the certificate, chain
        and Rekor bundle annotations."""
        payload = simple_signing_payload(digest, reference)
        signature = signer.sign(payload)
        body = hashedrekord_v1(signature, hashlib.sha256(payload).digest(), signer.pem)
        when = int((integrated or T0 + timedelta(minutes=1)).timestamp())
        entry = self.rekor.entry(body, when, with_proof=False)
        annotation = {
            "SignedEntryTimestamp": entry["inclusionPromise"]["signedEntryTimestamp"],
            "Payload": {
                "body": b64(body),
                "integratedTime": when,
                "logIndex": int(entry["logIndex"]),
                "logID": self.rekor.log_id.hex(),
            },
        }
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.intermediate, self.root))
        return SimpleSigningLayer(
            payload,
            signature,
            compact(annotation).decode(),
            extra={"dev.sigstore.cosign/certificate": signer.pem.decode(), "dev.sigstore.cosign/chain": chain.decode()},
        )

    def legacy_attestation_layer(self, statement: bytes, signer: Signer) -> SimpleSigningLayer:
        """``cosign attest`` (v2, keyless): the layer blob is the DSSE envelope; its
        signature annotation is empty, the certificate and Rekor bundle are annotated."""
        signature = signer.sign(pae(INTOTO_PAYLOAD_TYPE, statement))
        envelope = {
            "payloadType": INTOTO_PAYLOAD_TYPE,
            "payload": b64(statement),
            "signatures": [{"sig": b64(signature)}],
        }
        body = dsse_v1(envelope, statement, signature, signer.pem)
        when = int((T0 + timedelta(minutes=1)).timestamp())
        entry = self.rekor.entry(body, when, with_proof=False)
        annotation = {
            "SignedEntryTimestamp": entry["inclusionPromise"]["signedEntryTimestamp"],
            "Payload": {
                "body": b64(body),
                "integratedTime": when,
                "logIndex": int(entry["logIndex"]),
                "logID": self.rekor.log_id.hex(),
            },
        }
        layer = SimpleSigningLayer(compact(envelope), b"", compact(annotation).decode())
        return SimpleSigningLayer(
            layer.payload, b"", layer.rekor_bundle, extra={"dev.sigstore.cosign/certificate": signer.pem.decode()}
        )

    def dsse_bundle(
        self,
        statement: bytes,
        signer: Signer,
        *,
        rekor: int = 1,
        integrated: datetime | None = None,
        timestamp: datetime | None = None,
        with_set: bool = True,
        with_proof: bool = True,
    ) -> dict[str, Any]:
        """A Sigstore bundle v0.3 (cosign v3 keyless): DSSE envelope, certificate, log entry
        in Rekor v1 (dsse 0.0.1) or v2 (dsse 0.0.2), optionally an RFC 3161 timestamp."""
        signature = signer.sign(pae(INTOTO_PAYLOAD_TYPE, statement))
        envelope = {
            "payload": b64(statement),
            "payloadType": INTOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": b64(signature)}],
        }
        when = int((integrated or T0 + timedelta(minutes=1)).timestamp())
        if rekor == 1:
            body = dsse_v1(envelope, statement, signature, signer.pem)
            entry = self.rekor.entry(body, when, with_set=with_set, with_proof=with_proof)
        elif rekor == 2:
            entry = self.rekor2.entry(dsse_v2(statement, signature, signer.der), 0)
        else:  # Rekor v2 logging the DSSE signature as a hashedrekord over the PAE
            message = hashlib.sha256(pae(INTOTO_PAYLOAD_TYPE, statement)).digest()
            entry = self.rekor2.entry(hashedrekord_v2(message, signature, signer.der), 0)
        material: dict[str, Any] = {"certificate": {"rawBytes": b64(signer.der)}, "tlogEntries": [entry]}
        if timestamp is not None:
            material["timestampVerificationData"] = {
                "rfc3161Timestamps": [{"signedTimestamp": b64(self.timestamp(signature, timestamp))}]
            }
        return {
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": material,
            "dsseEnvelope": envelope,
        }


def statement(digest: str, reference: str, predicate_type: str = SIGN_PREDICATE, predicate: Any = None) -> bytes:
    algorithm, _, hexpart = digest.partition(":")
    return compact(
        {
            "_type": STATEMENT_V1,
            "subject": [{"name": reference, "digest": {algorithm: hexpart}}],
            "predicateType": predicate_type,
            "predicate": predicate or {},
        }
    )


def hashedrekord_v1(signature: bytes, digest: bytes, signer_pem: bytes) -> bytes:
    return compact(
        {
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": {"hash": {"algorithm": "sha256", "value": digest.hex()}},
                "signature": {"content": b64(signature), "publicKey": {"content": b64(signer_pem)}},
            },
        }
    )


def dsse_v1(envelope: dict[str, Any], payload: bytes, signature: bytes, signer_pem: bytes) -> bytes:
    sha = {"algorithm": "sha256"}
    return compact(
        {
            "apiVersion": "0.0.1",
            "kind": "dsse",
            "spec": {
                "envelopeHash": {**sha, "value": hashlib.sha256(compact(envelope)).hexdigest()},
                "payloadHash": {**sha, "value": hashlib.sha256(payload).hexdigest()},
                "signatures": [{"signature": b64(signature), "verifier": b64(signer_pem)}],
            },
        }
    )


def hashedrekord_v2(digest: bytes, signature: bytes, cert_der: bytes) -> bytes:
    verifier = {"x509Certificate": {"rawBytes": b64(cert_der)}, "keyDetails": "PKIX_ECDSA_P256_SHA_256"}
    return compact(
        {
            "apiVersion": "0.0.2",
            "kind": "hashedrekord",
            "spec": {
                "hashedRekordV002": {
                    "data": {"algorithm": "SHA2_256", "digest": b64(digest)},
                    "signature": {"content": b64(signature), "verifier": verifier},
                }
            },
        }
    )


def dsse_v2(payload: bytes, signature: bytes, cert_der: bytes) -> bytes:
    return compact(
        {
            "apiVersion": "0.0.2",
            "kind": "dsse",
            "spec": {
                "dsseV002": {
                    "payloadHash": {"algorithm": "SHA2_256", "digest": b64(hashlib.sha256(payload).digest())},
                    "signatures": [
                        {
                            "content": b64(signature),
                            "verifier": {
                                "x509Certificate": {"rawBytes": b64(cert_der)},
                                "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                            },
                        }
                    ],
                }
            },
        }
    )


def _raw(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def _spki(key: Any) -> bytes:
    data: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _ca_cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fake"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


def _tsa_leaf(
    key: ec.EllipticCurvePrivateKey, root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-tsa")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(root_key, hashes.SHA384())
    )
