"""The ``attestations`` rule: parsing (errors name the field) and its check against the
verification it asks the image's facts for (the verifier: tests/test_keyless.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from proxy.oci.reference import ImageReference
from proxy.policy.fields import FieldError
from proxy.policy.rules.attestation import Attestations, build
from proxy.policy.rules.base import ImageContext, Origin, ResolutionFailed
from proxy.trust.cosign import Reason
from proxy.trust.service import VerificationCache
from proxy.trust.trustroot import RootHolder
from proxy.trust.verification import KeyResult, SignaturePolicy, VerificationResult
from tests.signer import generate_key

PATH = "spec.rules.attestations"
KEY = generate_key()
GITHUB = "https://token.actions.githubusercontent.com"
SLSA1 = "https://slsa.dev/provenance/v1"
KEYLESS = [{"issuer": GITHUB, "subjectRegExp": "https://github\\.com/acme/.*"}]
BASE = {"name": "provenance", "predicateType": SLSA1, "keyless": KEYLESS}
DIGEST = Digest.parse("sha256:" + "d" * 64)


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ([BASE], None),
        ([{**BASE, "conditions": {"runDetails.builder.id": "https://github.com/*"}, "maxAge": "30d"}], None),
        ([{"name": "scan", "predicateType": "https://cosign.sigstore.dev/attestation/vuln/v1",
           "keys": [{"name": "scanner", "publicKey": KEY.public_pem.decode()}], "maxAge": "1d"}], None),
        ([BASE, {**BASE, "name": "sbom", "predicateType": "https://cyclonedx.org/bom"}], None),
        ({}, f"{PATH}: expected a non-empty list"),
        ([], f"{PATH}: expected a non-empty list"),
        ([{**BASE, "name": None}], f"{PATH}[0].name: expected a non-empty string"),
        ([{k: v for k, v in BASE.items() if k != "predicateType"}], f"{PATH}[0].predicateType: expected"),
        ([{"name": "p", "predicateType": SLSA1}], f"{PATH}[0].keys: expected a non-empty list"),
        ([{**BASE, "conditions": ["runDetails.builder.id"]}], f"{PATH}[0].conditions: expected a mapping"),
        ([{**BASE, "conditions": {"runDetails.builder.id": 3}}], f"{PATH}[0].conditions.runDetails.builder.id"),
        ([{**BASE, "maxAge": "later"}], f"{PATH}[0].maxAge"),
        ([{**BASE, "predicate": SLSA1}], f"{PATH}[0].predicate: unknown field"),
        ([BASE, BASE], f"{PATH}[1].name: duplicate attestation name"),
    ],
)  # fmt: skip
def test_build(tmp_path: Path, doc: Any, error: str | None) -> None:
    if error is None:
        rule = build(doc, PATH, Origin(tmp_path, RootHolder()))
        assert isinstance(rule, Attestations)
        assert [r.policy.purpose.predicate_type for r in rule.requirements] == [d["predicateType"] for d in doc]
        return
    with pytest.raises(FieldError, match=error.replace("[", r"\[").replace("]", r"\]")):
        build(doc, PATH, Origin(tmp_path, RootHolder()))


class Facts:
    def __init__(self, results: dict[str, VerificationResult | None]) -> None:
        self.results = results

    async def signatures(self, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        result = self.results[str(policy.purpose.predicate_type)]
        if result is None:
            raise ResolutionFailed("upstream ghcr.io unreachable")
        return result


def _result(reason: Reason | None, why: str = "") -> VerificationResult:
    name = "https://github\\.com/acme/.*"
    return VerificationResult((KeyResult(f"/{name}/", reason, why=why),), 1)


@pytest.mark.parametrize(
    ("result", "violation"),
    [
        (_result(None), None),
        (
            _result(Reason.CONDITION_FAILED, "runDetails.builder.id is 'x', wanted 'https://github.com/*'"),
            "requires attestation provenance (https://slsa.dev/provenance/v1): 0 of 1 required attestations verified;"
            " /https://github\\.com/acme/.*/: attestation condition not met"
            " (runDetails.builder.id is 'x', wanted 'https://github.com/*')",
        ),
        (None, "requires attestation provenance, but verification could not run: upstream ghcr.io unreachable"),
    ],
)
async def test_check(tmp_path: Path, result: VerificationResult | None, violation: str | None) -> None:
    rule = build([BASE], PATH, Origin(tmp_path, RootHolder()))
    assert isinstance(rule, Attestations)
    ref = ImageReference.parse(f"ghcr.io/acme/app@{DIGEST}")
    facts = Facts({SLSA1: result})
    context = ImageContext('container "app"', str(ref), ref, "prod", facts, True)  # type: ignore[arg-type]
    assert await rule.check(context) == ((violation,) if violation else ())
