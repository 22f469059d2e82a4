"""The ``signatures`` rule: parsing (errors name the field) and its check against the
verification it asks the image's facts for (the verifier itself: test_cosign.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from proxy.oci.reference import ImageReference
from proxy.policy.document import load_file
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import ImageContext, Origin, ResolutionFailed
from proxy.policy.rules.signature import Signatures, build
from proxy.trust.service import VerificationCache
from proxy.trust.trustroot import RootHolder
from proxy.trust.verification import KeyResult, SignaturePolicy, VerificationResult, evaluate
from tests.signer import generate_key, unsupported_public_pem

KEY = generate_key()
OTHER = generate_key()
DSA_PEM = unsupported_public_pem("dsa")  # slow to generate: once
PATH = "spec.rules.signatures"
ROOT = Path(__file__).parent.parent
DIGEST = Digest.parse("sha256:" + "c" * 64)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ci.pub").write_bytes(KEY.public_pem)
    (tmp_path / "keys" / "dsa.pub").write_bytes(DSA_PEM)
    return tmp_path


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}]}, None),
        ({"keys": [{"name": "ci", "publicKey": KEY.public_pem.decode()}], "cacheTTL": "1h"}, None),
        ({}, f"{PATH}.keys: expected a non-empty list"),
        ({"keys": []}, f"{PATH}.keys: expected a non-empty list"),
        ({"keys": [{"publicKeyFile": "keys/ci.pub"}]}, f"{PATH}.keys[0].name: expected a non-empty string"),
        ({"keys": [{"name": "ci"}]}, f"{PATH}.keys[0]: give exactly one of publicKey or publicKeyFile"),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/missing.pub"}]}, f"{PATH}.keys[0].publicKeyFile: cannot read"),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/dsa.pub"}]}, f"{PATH}.keys[0].publicKeyFile"),
        ({"keys": [{"name": "ci", "publicKey": "not a key"}]}, f"{PATH}.keys[0].publicKey"),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub", "kms": "x"}]}, f"{PATH}.keys[0].kms: unknown field"),
        (
            {
                "keys": [
                    {"name": "a", "publicKeyFile": "keys/ci.pub"},
                    {"name": "a", "publicKey": OTHER.public_pem.decode()},
                ]
            },
            f"{PATH}.keys[1].name: duplicate key name",
        ),
        (
            {"keys": [{"name": "a", "publicKeyFile": "keys/ci.pub"}, {"name": "b", "publicKeyFile": "keys/ci.pub"}]},
            f"{PATH}.keys: .*are the same",
        ),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}], "threshold": 2}, f"{PATH}.threshold: must be"),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}], "threshold": True}, f"{PATH}.threshold: must be"),
        (
            {"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}], "cacheTTL": "soon"},
            f"{PATH}.cacheTTL: not a duration",
        ),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}], "transparencyLog": {}}, f"{PATH}.transparencyLog"),
    ],
)
def test_build(keys_dir: Path, doc: dict[str, Any], error: str | None) -> None:
    if error is None:
        rule = build(doc, PATH, Origin(keys_dir, RootHolder()))
        assert isinstance(rule, Signatures)
        return
    with pytest.raises(FieldError, match=error.replace("[", r"\[").replace("]", r"\]")):
        build(doc, PATH, Origin(keys_dir, RootHolder()))


class Facts:
    """ImageFacts that answer only ``signatures`` (with a fixed verdict, or a failure)."""

    def __init__(self, verified: bool | None) -> None:
        self.verified = verified
        self.calls = 0

    async def signatures(self, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        self.calls += 1
        if self.verified is None:
            raise ResolutionFailed("upstream ghcr.io unreachable")
        return evaluate([], [DIGEST], policy) if not self.verified else _verified(policy)


def _verified(policy: SignaturePolicy) -> VerificationResult:
    return VerificationResult(tuple(KeyResult(name, None) for name in policy.keys), policy.threshold)


@pytest.mark.parametrize(
    ("verified", "violation"),
    [
        (True, None),
        (False, "requires a valid signature: 0 of 1 required signatures verified; ci: no signature found"),
        (None, "requires signed images, but verification could not run: upstream ghcr.io unreachable"),
    ],
)
async def test_check(keys_dir: Path, verified: bool | None, violation: str | None) -> None:
    rule = build({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}]}, PATH, Origin(keys_dir, RootHolder()))
    assert isinstance(rule, Signatures)
    ref = ImageReference.parse(f"ghcr.io/acme/app@{DIGEST}")
    context = ImageContext('container "app"', str(ref), ref, "prod", Facts(verified), True)  # type: ignore[arg-type]
    assert await rule.check(context) == ((violation,) if violation else ())


GITHUB = "https://token.actions.githubusercontent.com"
WORKFLOW = "https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*"
KEYLESS = {"issuer": GITHUB, "subject": WORKFLOW}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"keyless": [KEYLESS]}, None),
        ({"keyless": [{"issuerRegExp": "https://token\\..*", "subjectRegExp": "https://github\\.com/acme/.*"}]}, None),
        ({"keyless": [{**KEYLESS, "extensions": {"sourceRepositoryOwnerURI": "https://github.com/acme"}}]}, None),
        ({"keyless": [KEYLESS], "keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}], "threshold": 2}, None),
        ({"keyless": [KEYLESS], "trustedRoot": "root.json"}, None),
        ({"keyless": [KEYLESS, {"issuer": "https://accounts.google.com", "subject": WORKFLOW}]}, None),
        ({"keyless": []}, f"{PATH}.keyless: expected a non-empty list"),
        ({"keyless": [{"subject": WORKFLOW}]}, f"{PATH}.keyless[0]: give exactly one of issuer or issuerRegExp"),
        ({"keyless": [{"issuer": GITHUB}]}, f"{PATH}.keyless[0]: give exactly one of subject or subjectRegExp"),
        (
            {"keyless": [{**KEYLESS, "subjectRegExp": ".*"}]},
            f"{PATH}.keyless[0]: give exactly one of subject or subjectRegExp",
        ),
        ({"keyless": [{"issuer": GITHUB, "subjectRegExp": "("}]}, f"{PATH}.keyless[0]: invalid regular expression"),
        ({"keyless": [{**KEYLESS, "email": "x"}]}, f"{PATH}.keyless[0].email: unknown field"),
        ({"keyless": [{**KEYLESS, "extensions": {"repo": "x"}}]}, f"{PATH}.keyless[0].extensions.repo: unknown field"),
        ({"keyless": [{**KEYLESS, "extensions": {"buildTrigger": 1}}]}, f"{PATH}.keyless[0].extensions.buildTrigger"),
        ({"keyless": [KEYLESS], "threshold": 2}, f"{PATH}.threshold: must be a whole number from 1 to 1"),
        ({"keyless": [KEYLESS], "trustedRoot": "missing.json"}, f"{PATH}.trustedRoot: .*cannot read"),
        ({"keyless": [KEYLESS], "trustedRoot": "keys/ci.pub"}, f"{PATH}.trustedRoot: .*not JSON"),
        ({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}], "trustedRoot": "root.json"}, f"{PATH}.trustedRoot"),
    ],
)
def test_build_keyless(keys_dir: Path, doc: dict[str, Any], error: str | None) -> None:
    shutil.copy(ROOT / "proxy/trust/data/trusted_root.json", keys_dir / "root.json")
    if error is None:
        rule = build(doc, PATH, Origin(keys_dir, RootHolder()))
        assert isinstance(rule, Signatures)
        assert rule.policy.trusted_root is not None
        assert len(rule.policy.identities) == len(doc["keyless"])
        return
    with pytest.raises(FieldError, match=error.replace("[", r"\[").replace("]", r"\]")):
        build(doc, PATH, Origin(keys_dir, RootHolder()))


def test_keyless_default_root_is_public_good(keys_dir: Path) -> None:
    rule = build({"keyless": [KEYLESS]}, PATH, Origin(keys_dir, RootHolder()))
    assert isinstance(rule, Signatures) and isinstance(rule.policy.trusted_root, RootHolder)
    root = rule.policy.root()
    assert root is not None and root.name == "sigstore public-good (shipped)"
    urls = {log.url for log in root.tlogs.values()}
    assert urls == {"https://rekor.sigstore.dev", "https://log2025-1.rekor.sigstore.dev"}


def test_example_policies_name_the_identities_the_issue_asks_for() -> None:
    (k8s,) = load_file(ROOT / "policies" / "kubernetes-images.yaml")
    rule = next(r for r in k8s.rules if isinstance(r, Signatures))
    (identity,) = rule.policy.identities
    assert identity.subject.text == "krel-trust@k8s-releng-prod.iam.gserviceaccount.com"
    assert identity.issuer.text == "https://accounts.google.com"
    github = load_file(ROOT / "policies" / "github-release-keyless.yaml")
    assert [p.name for p in github] == ["github-release-keyless", "github-release-provenance"]
