"""The ``signatures`` rule: parsing (errors name the field) and its check against the
verification it asks the image's facts for (the verifier itself: test_cosign.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from proxy.oci.reference import ImageReference
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import ImageContext, ResolutionFailed
from proxy.policy.rules.signature import Signatures, build
from proxy.trust.service import VerificationCache
from proxy.trust.verification import KeyResult, SignaturePolicy, VerificationResult, evaluate
from tests.signer import generate_key, unsupported_public_pem

KEY = generate_key()
OTHER = generate_key()
PATH = "spec.rules.signatures"
DIGEST = Digest.parse("sha256:" + "c" * 64)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ci.pub").write_bytes(KEY.public_pem)
    (tmp_path / "keys" / "dsa.pub").write_bytes(unsupported_public_pem("dsa"))
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
        rule = build(doc, PATH, keys_dir)
        assert isinstance(rule, Signatures)
        return
    with pytest.raises(FieldError, match=error.replace("[", r"\[").replace("]", r"\]")):
        build(doc, PATH, keys_dir)


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
    rule = build({"keys": [{"name": "ci", "publicKeyFile": "keys/ci.pub"}]}, PATH, keys_dir)
    assert isinstance(rule, Signatures)
    ref = ImageReference.parse(f"ghcr.io/acme/app@{DIGEST}")
    context = ImageContext('container "app"', str(ref), ref, "prod", Facts(verified), True)  # type: ignore[arg-type]
    assert await rule.check(context) == ((violation,) if violation else ())
