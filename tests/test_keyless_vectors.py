"""Keyless and bundle verification against signatures written by real Sigstore signers,
offline with the public-good trusted root pullgate ships: sigstore-conformance bundles
(v0.3 message signature and DSSE, keyless and keyed with an RFC 3161 timestamp), a sigstore-go
v0.1 keyed DSSE bundle, and containers/image's legacy cosign keyless signature (Fulcio
certificate + Rekor SET annotations). Vectors: tests/data/sigstore and tests/data/cosign
(README and PROVENANCE files there). Every negative is a real vector changed in one place,
and each must fail with its own reason."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import KeyUnsupported
from proxy.oci.digest import Digest
from proxy.trust import cosign
from proxy.trust.bundles import parse_bundle
from proxy.trust.checks import SIGNATURE, Purpose
from proxy.trust.cosign import Reason, Signature
from proxy.trust.identity import KeylessIdentity
from proxy.trust.keys import load_public_key
from proxy.trust.trustroot import TrustedRoot, default_trusted_root
from proxy.trust.verification import SignaturePolicy, VerificationResult, evaluate

DATA = Path(__file__).parent / "data"
SIGSTORE = DATA / "sigstore"
COSIGN = DATA / "cosign"
A_TXT = Digest.parse("sha256:a0cfc71271d6e278e57cd332ff957c3f7043fdda354c4cbb190a30d56efa01bf")
NPM = Digest.parse(
    "sha512:76176ffa33808b54602c7c35de5c6e9a4deb96066dba6533f50ac234f4f1f4c6b3527515dc17c06fbe2860030f410eee69ea20079bd3a2c6f3dcf3b329b10751"
)
BEACON = (
    "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/"
    ".github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main"
)
GITHUB = "https://token.actions.githubusercontent.com"
SLSA1 = "https://slsa.dev/provenance/v1"
NPM_PUBLISH = "https://github.com/npm/attestation/tree/main/specs/publish/v0.1"
KEYLESS_MSG = "04-blob-bundle-v03-msgsig-keyless-conformance"
KEYED_TSA = "05-blob-bundle-v03-msgsig-keyed-conformance"
KEYLESS_DSSE = "06-blob-bundle-v03-dsse-keyless-conformance"
KEYED_NPM = "12-blob-bundle-v01-dsse-keyed-npm-publish"
LEGACY = COSIGN / "containers-image-fulcio-rekor-valid"
PUBLIC_GOOD = default_trusted_root()
REKOR_V1 = next(log.key for log in PUBLIC_GOOD.tlogs.values() if log.url == "https://rekor.sigstore.dev")


def bundle_doc(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((SIGSTORE / name / "bundle.sigstore.json").read_text())
    return doc


def bundle(name: str, change: Callable[[dict[str, Any]], None] | None = None) -> Signature:
    doc = bundle_doc(name)
    if change is not None:
        change(doc)
    return parse_bundle(json.dumps(doc).encode(), name)


def legacy(change: Callable[[dict[str, str]], None] | None = None) -> Signature:
    annotations = json.loads((LEGACY / "annotations.json").read_text())
    if change is not None:
        change(annotations)
    payload = (LEGACY / "payload.json").read_bytes()
    layer = cosign.SignatureLayer(
        Digest.of(payload),
        annotations[cosign.SIGNATURE_ANNOTATION],
        annotations.get(cosign.REKOR_ANNOTATION),
        cosign.SIMPLESIGNING_MEDIA_TYPE,
        annotations.get(cosign.CERTIFICATE_ANNOTATION),
    )
    return cosign.simple_signature(layer, payload, "legacy .sig layer 0")


LEGACY_IMAGE = Digest.of((LEGACY / "image-manifest.json").read_bytes())


def root_with(change: Callable[[dict[str, Any]], None]) -> TrustedRoot:
    doc = json.loads((Path(__file__).parent.parent / "proxy/trust/data/trusted_root.json").read_text())
    change(doc)
    return TrustedRoot.from_json(json.dumps(doc).encode(), "changed public-good root")


def _not_rekor(doc: dict[str, Any]) -> None:
    pem = (SIGSTORE / "_trust" / "not-rekor.pub").read_text()
    der = base64.b64decode("".join(line for line in pem.splitlines() if "-----" not in line))
    doc["tlogs"][0]["publicKey"]["rawBytes"] = base64.b64encode(der).decode()


def _other_ct_key(doc: dict[str, Any]) -> None:
    for log in doc["ctlogs"]:
        log["publicKey"]["rawBytes"] = doc["tlogs"][0]["publicKey"]["rawBytes"]


def _no_fulcio(doc: dict[str, Any]) -> None:
    doc["certificateAuthorities"] = [doc["certificateAuthorities"][0]]  # only the 2021-22 CA


@dataclass(frozen=True)
class Case:
    signature: Callable[[], Signature]
    digest: Digest
    key: str | None = None  # a key file (keyed), else keyless with ``identity``
    identity: tuple[str, str] | None = (BEACON, GITHUB)  # subject, issuer
    purpose: Purpose = SIGNATURE
    root: Callable[[], TrustedRoot] = lambda: PUBLIC_GOOD
    vector: str = KEYED_TSA  # where ``key`` is


def _entry(doc: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = doc["verificationMaterial"]["tlogEntries"][0]
    return entry


def _flip_proof(doc: dict[str, Any]) -> None:
    hashes = _entry(doc)["inclusionProof"]["hashes"]
    raw = bytearray(base64.b64decode(hashes[3]))
    raw[0] ^= 1
    hashes[3] = base64.b64encode(bytes(raw)).decode()


def _forge_checkpoint(doc: dict[str, Any]) -> None:
    note = _entry(doc)["inclusionProof"]["checkpoint"]
    text = note["envelope"].partition("\n\n")[0]
    other = bundle_doc(KEYED_TSA)["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["checkpoint"]["envelope"]
    note["envelope"] = text + "\n\n" + other.partition("\n\n")[2]  # a real signature, of another checkpoint


def _strip_log(doc: dict[str, Any]) -> None:
    entry = _entry(doc)
    entry.pop("inclusionPromise")
    entry.pop("inclusionProof")


def _strip_set(doc: dict[str, Any]) -> None:
    _entry(doc).pop("inclusionPromise")


def _tamper_set(doc: dict[str, Any]) -> None:
    entry = _entry(doc)
    entry["integratedTime"] = str(int(entry["integratedTime"]) + 60)


def _tamper_dsse(doc: dict[str, Any]) -> None:
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["buildDefinition"]["externalParameters"]["workflow"]["repository"] = "https://evil.example"
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()


def _entry_of_other_artifact(doc: dict[str, Any]) -> None:
    doc["verificationMaterial"]["tlogEntries"] = bundle_doc(KEYLESS_MSG)["verificationMaterial"]["tlogEntries"]


def _corrupt_timestamp(doc: dict[str, Any]) -> None:
    stamp = doc["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]
    raw = bytearray(base64.b64decode(stamp["signedTimestamp"]))
    raw[-5] ^= 1  # inside the authority's signature
    stamp["signedTimestamp"] = base64.b64encode(bytes(raw)).decode()


def _drop_legacy_bundle(annotations: dict[str, str]) -> None:
    del annotations[cosign.REKOR_ANNOTATION]


LEGACY_ID = ("mitr@redhat.com", "https://github.com/login/oauth")
CASES: dict[str, tuple[Case, Reason | None]] = {
    # --- what the vectors' README says ------------------------------------------------------
    "04-keyless-msgsig": (Case(lambda: bundle(KEYLESS_MSG), A_TXT), None),
    "04-other-artifact": (
        Case(lambda: bundle(KEYLESS_MSG), Digest.parse("sha256:" + "2" * 64)),
        Reason.DIGEST_MISMATCH,
    ),
    "05-keyed-rekor-and-timestamp": (Case(lambda: bundle(KEYED_TSA), A_TXT, key="key.pub", identity=None), None),
    "05-other-valid-key": (
        Case(lambda: bundle(KEYED_TSA), A_TXT, key="other-valid-key.pub", identity=None),
        Reason.BAD_SIGNATURE,
    ),
    "05-no-key-keyless-only": (Case(lambda: bundle(KEYED_TSA), A_TXT), Reason.NO_SIGNATURE),
    "06-keyless-dsse-attestation": (Case(lambda: bundle(KEYLESS_DSSE), A_TXT, purpose=Purpose(SLSA1)), None),
    "06-other-artifact": (
        Case(lambda: bundle(KEYLESS_DSSE), Digest.parse("sha256:" + "3" * 64), purpose=Purpose(SLSA1)),
        Reason.DIGEST_MISMATCH,
    ),
    "12-keyed-v01-dsse-npm": (
        Case(
            lambda: bundle(KEYED_NPM), NPM, key="key.pub", identity=None, purpose=Purpose(NPM_PUBLISH), vector=KEYED_NPM
        ),
        None,
    ),
    "12-other-key": (
        Case(
            lambda: bundle(KEYED_NPM),
            NPM,
            key="other-valid-key.pub",
            identity=None,
            purpose=Purpose(NPM_PUBLISH),
        ),
        Reason.BAD_SIGNATURE,
    ),
    "legacy-keyless-fulcio-rekor": (Case(legacy, LEGACY_IMAGE, identity=LEGACY_ID), None),
    # --- negatives: one change each --------------------------------------------------------
    "wrong-identity": (
        Case(lambda: bundle(KEYLESS_MSG), A_TXT, identity=(BEACON + "x", GITHUB)),
        Reason.IDENTITY_MISMATCH,
    ),
    "wrong-issuer": (
        Case(lambda: bundle(KEYLESS_MSG), A_TXT, identity=(BEACON, "https://accounts.google.com")),
        Reason.ISSUER_MISMATCH,
    ),
    "legacy-wrong-identity": (
        Case(legacy, LEGACY_IMAGE, identity=("someone@redhat.com", LEGACY_ID[1])),
        Reason.IDENTITY_MISMATCH,
    ),
    "wrong-rekor-key": (
        Case(lambda: bundle(KEYLESS_MSG), A_TXT, root=lambda: root_with(_not_rekor)),
        Reason.UNTRUSTED_LOG,
    ),
    "legacy-wrong-rekor-key": (
        Case(legacy, LEGACY_IMAGE, identity=LEGACY_ID, root=lambda: root_with(_not_rekor)),
        Reason.UNTRUSTED_LOG,
    ),
    "missing-set-and-proof": (Case(lambda: bundle(KEYLESS_MSG, _strip_log), A_TXT), Reason.NOT_IN_TLOG),
    "legacy-missing-set": (
        Case(lambda: legacy(_drop_legacy_bundle), LEGACY_IMAGE, identity=LEGACY_ID),
        Reason.NOT_IN_TLOG,
    ),
    "proof-only-no-signed-time": (Case(lambda: bundle(KEYLESS_MSG, _strip_set), A_TXT), Reason.NOT_IN_TLOG),
    "tampered-set": (Case(lambda: bundle(KEYLESS_MSG, _tamper_set), A_TXT), Reason.UNTRUSTED_LOG),
    "corrupted-inclusion-proof": (Case(lambda: bundle(KEYLESS_MSG, _flip_proof), A_TXT), Reason.BAD_INCLUSION_PROOF),
    "checkpoint-signature-of-another-tree": (
        Case(lambda: bundle(KEYLESS_MSG, _forge_checkpoint), A_TXT),
        Reason.BAD_INCLUSION_PROOF,
    ),
    "tampered-dsse": (
        Case(lambda: bundle(KEYLESS_DSSE, _tamper_dsse), A_TXT, purpose=Purpose(SLSA1)),
        Reason.BAD_SIGNATURE,
    ),
    "log-entry-for-another-artifact": (
        Case(lambda: bundle(KEYLESS_DSSE, _entry_of_other_artifact), A_TXT, purpose=Purpose(SLSA1)),
        Reason.LOG_ENTRY_MISMATCH,
    ),
    "attestation-used-as-signature": (Case(lambda: bundle(KEYLESS_DSSE), A_TXT), Reason.WRONG_PREDICATE),
    "attestation-of-another-type": (
        Case(lambda: bundle(KEYLESS_DSSE), A_TXT, purpose=Purpose("https://cyclonedx.org/bom")),
        Reason.WRONG_PREDICATE,
    ),
    "signature-used-as-attestation": (
        Case(legacy, LEGACY_IMAGE, identity=LEGACY_ID, purpose=Purpose(SLSA1)),
        Reason.WRONG_PREDICATE,
    ),
    "corrupted-timestamp": (
        Case(lambda: bundle(KEYED_TSA, _corrupt_timestamp), A_TXT, key="key.pub", identity=None),
        Reason.BAD_TIMESTAMP,
    ),
    "ca-not-in-trusted-root": (
        Case(lambda: bundle(KEYLESS_MSG), A_TXT, root=lambda: root_with(_no_fulcio)),
        Reason.UNTRUSTED_CERTIFICATE,
    ),
    "sct-not-by-trusted-ct-log": (
        Case(lambda: bundle(KEYLESS_MSG), A_TXT, root=lambda: root_with(_other_ct_key)),
        Reason.BAD_SCT,
    ),
}


def run(case: Case) -> VerificationResult:
    keys = {}
    if case.key is not None:
        keys["key"] = load_public_key((SIGSTORE / case.vector / case.key).read_bytes())
    identities = ()
    if case.identity is not None:
        identities = (KeylessIdentity.of(subject=case.identity[0], issuer=case.identity[1], name="keyless"),)
    policy = SignaturePolicy(keys, 1, REKOR_V1 if keys else None, identities, case.root(), case.purpose)
    return evaluate([case.signature()], [case.digest], policy)


@pytest.mark.parametrize(("name", "expected"), [pytest.param(n, e, id=n) for n, (_, e) in CASES.items()])
def test_vector(name: str, expected: Reason | None) -> None:
    result = run(CASES[name][0])
    assert result.keys[0].reason is expected, result.keys[0]
    assert result.allowed is (expected is None)


def test_keyed_vector_wrong_key_does_not_even_load() -> None:
    """sigstore-conformance's managed-key-wrong-key_fail: the key is corrupt."""
    with pytest.raises(KeyUnsupported, match="unreadable public key"):
        load_public_key((SIGSTORE / KEYED_TSA / "wrong-key.pub").read_bytes())


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ((BEACON + "x", GITHUB), f"wanted '{BEACON}x'"),
        ((BEACON, "https://accounts.google.com"), "issuer 'https://token.actions.githubusercontent.com', wanted"),
    ],
)
def test_denial_says_found_and_wanted(identity: tuple[str, str], expected: str) -> None:
    result = run(Case(lambda: bundle(KEYLESS_MSG), A_TXT, identity=identity))
    assert expected in result.message()
    if identity[1] == GITHUB:
        assert f"identity '{BEACON}'" in result.message()


def test_keyless_result_names_the_identity_and_the_verified_time() -> None:
    result = run(Case(lambda: bundle(KEYLESS_MSG), A_TXT))
    found = result.keys[0].identity
    assert found is not None and found.subject == BEACON and found.issuer == GITHUB
    assert (
        found.extensions["sourceRepositoryURI"]
        == "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon"
    )
    assert found.extensions["buildTrigger"] == "workflow_dispatch"


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        ({"sourceRepositoryOwnerURI": "https://github.com/sigstore-conformance"}, None),
        (
            {"sourceRepositoryURI": "https://github.com/sigstore-conformance/*", "runnerEnvironment": "github-hosted"},
            None,
        ),
        ({"sourceRepositoryRef": "refs/tags/*"}, Reason.EXTENSION_MISMATCH),
        ({"buildTrigger": "push"}, Reason.EXTENSION_MISMATCH),
        ({"deploymentEnvironment": "prod"}, Reason.EXTENSION_MISMATCH),  # absent from the certificate
    ],
)
def test_github_extensions(extensions: dict[str, str], expected: Reason | None) -> None:
    identity = KeylessIdentity.of(subject=BEACON, issuer=GITHUB, extensions=extensions)
    policy = SignaturePolicy({}, 1, None, (identity,), PUBLIC_GOOD)
    result = evaluate([bundle(KEYLESS_MSG)], [A_TXT], policy)
    assert result.keys[0].reason is expected


@pytest.mark.parametrize(
    ("subject", "subject_re", "issuer", "issuer_re", "expected"),
    [
        ("https://github.com/sigstore-conformance/*/.github/workflows/*@refs/heads/main", None, GITHUB, None, None),
        ("https://github.com/*/.github/workflows/*@refs/heads/main", None, GITHUB, None, Reason.IDENTITY_MISMATCH),
        ("https://github.com/sigstore-conformance/**", None, "https://token.actions.*.com", None, None),
        (None, r"https://github\.com/sigstore-conformance/.*", None, r"https://token\.actions\..*", None),
        # Anchored: a regexp that would merely occur in the identity (cosign's search) does not match.
        (None, "sigstore-conformance", None, ".*", Reason.IDENTITY_MISMATCH),
        (None, ".*", None, "githubusercontent", Reason.ISSUER_MISMATCH),
    ],
)
def test_identity_forms(
    subject: str | None, subject_re: str | None, issuer: str | None, issuer_re: str | None, expected: Reason | None
) -> None:
    identity = KeylessIdentity.of(subject=subject, subject_regexp=subject_re, issuer=issuer, issuer_regexp=issuer_re)
    result = evaluate([bundle(KEYLESS_MSG)], [A_TXT], SignaturePolicy({}, 1, None, (identity,), PUBLIC_GOOD))
    assert result.keys[0].reason is expected


def test_mutating_a_vector_copy_leaves_the_original() -> None:
    """The helpers change copies: a later case sees the vector as published."""
    before = copy.deepcopy(bundle_doc(KEYLESS_MSG))
    bundle(KEYLESS_MSG, _flip_proof)
    assert bundle_doc(KEYLESS_MSG) == before
