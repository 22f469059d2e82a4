"""Keyless signatures and attestations end to end through ``verify_image`` and the
verification service, signed by the private Sigstore of tests/sigstore_fakes.py (so tests
can make what real vectors cannot show: a certificate outside its validity at the
integrated time, Rekor v2 entries timestamped by a TSA, GitHub extensions, attestations
with conditions and ages). The real vectors: tests/test_keyless_vectors.py."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.errors import PullgateError, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.trust import rekor, verification
from proxy.trust.attestations import StatementRequirements
from proxy.trust.checks import SIGNATURE, Purpose
from proxy.trust.cosign import DSSE_MEDIA_TYPE, MAX_PER_OBJECT, Reason
from proxy.trust.identity import KeylessIdentity, Matcher
from proxy.trust.service import Subject, VerificationCache, VerificationService
from proxy.trust.trustroot import TrustedRoot
from proxy.trust.verification import SignaturePolicy, VerificationResult, verify_image
from tests.signer import (
    OCI_INDEX,
    Artifact,
    MemoryRegistry,
    bundle_artifact,
    generate_key,
    legacy_artifact,
    sign_legacy,
)
from tests.sigstore_fakes import GITHUB, T0, WORKFLOW, FakeSigstore, Signer, statement

REPO = "acme/app"
REF = "ghcr.io/acme/app"
IMAGE = str(Digest.of(b"an image manifest"))
SLSA1 = "https://slsa.dev/provenance/v1"
RELEASE = "https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*"


@dataclass
class World:
    sigstore: FakeSigstore = field(default_factory=FakeSigstore)

    @property
    def root(self) -> TrustedRoot:
        return TrustedRoot.from_json(json.dumps(self.sigstore.trusted_root()).encode(), "fake root")

    def policy(self, subject: str = RELEASE, issuer: str = GITHUB, **kwargs: Any) -> SignaturePolicy:
        identity = KeylessIdentity.of(subject=subject, issuer=issuer)
        return SignaturePolicy({}, 1, None, (identity,), self.root, **kwargs)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def registry(*artifacts: Artifact, referrers_api: bool = True) -> MemoryRegistry:
    source = MemoryRegistry(referrers_api=referrers_api)
    for artifact in artifacts:
        source.push(REPO, artifact)
    return source


def bundles(*docs: dict[str, Any]) -> Artifact:
    return bundle_artifact(IMAGE, OCI_INDEX, 321, [json.dumps(d).encode() for d in docs])


def v02(doc: dict[str, Any], w: World) -> dict[str, Any]:
    """The same bundle as sigstore-go/cosign 2 wrote it: v0.2, the leaf first in a chain."""
    material = doc["verificationMaterial"]
    leaf = material.pop("certificate")
    chain = [leaf, {"rawBytes": base64.b64encode(w.sigstore.intermediate.public_bytes(Encoding.DER)).decode()}]
    material["x509CertificateChain"] = {"certificates": chain}
    return {**doc, "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.2"}


def signer(w: World, **kwargs: Any) -> Signer:
    return w.sigstore.issue(**kwargs)


def provenance(builder: str = "https://github.com/actions/runner/github-hosted", finished: datetime = T0) -> bytes:
    predicate = {
        "buildDefinition": {"externalParameters": {"workflow": {"repository": "https://github.com/acme/app"}}},
        "runDetails": {"builder": {"id": builder}, "metadata": {"finishedOn": finished.isoformat()}},
    }
    return statement(IMAGE, REF, SLSA1, predicate)


SIGNED = {
    "legacy": lambda w: legacy_artifact(IMAGE, [w.sigstore.legacy_layer(IMAGE, REF, signer(w))]),
    "bundle-rekor-v1": lambda w: bundles(w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w))),
    "bundle-rekor-v2-tsa": lambda w: bundles(
        w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w), rekor=2, timestamp=T0 + timedelta(minutes=2))
    ),
    "bundle-rekor-v2-hashedrekord-tsa": lambda w: bundles(
        w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w), rekor=3, timestamp=T0 + timedelta(minutes=2))
    ),
    "bundle-v0.2-certificate-chain": lambda w: bundles(
        v02(w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w)), w)
    ),
    "bundle-proof-only-tsa": lambda w: bundles(
        w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w), with_set=False, timestamp=T0 + timedelta(minutes=2))
    ),
}


@pytest.mark.parametrize("fmt", list(SIGNED))
@pytest.mark.parametrize("referrers_api", [True, False])
async def test_keyless_image_signature(world: World, fmt: str, referrers_api: bool) -> None:
    source = registry(SIGNED[fmt](world), referrers_api=referrers_api)
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], world.policy())
    assert result.allowed, result.message()
    found = result.keys[0].identity
    assert found is not None and found.subject == WORKFLOW and found.issuer == GITHUB


NEGATIVES = {
    # A genuine SET, an hour after the ten-minute certificate expired.
    "cert-expired-at-integrated-time": (
        lambda w: legacy_artifact(
            IMAGE, [w.sigstore.legacy_layer(IMAGE, REF, signer(w), integrated=T0 + timedelta(hours=1))]
        ),
        Reason.CERT_NOT_VALID_AT_TIME,
    ),
    "cert-not-yet-valid-at-integrated-time": (
        lambda w: legacy_artifact(
            IMAGE, [w.sigstore.legacy_layer(IMAGE, REF, signer(w), integrated=T0 - timedelta(minutes=1))]
        ),
        Reason.CERT_NOT_VALID_AT_TIME,
    ),
    "rekor-v2-without-timestamp": (
        lambda w: bundles(w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w), rekor=2)),
        Reason.NOT_IN_TLOG,
    ),
    "timestamp-after-expiry": (
        lambda w: bundles(
            w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w), rekor=2, timestamp=T0 + timedelta(minutes=11))
        ),
        Reason.CERT_NOT_VALID_AT_TIME,
    ),
    "no-sct": (
        lambda w: bundles(w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w, sct=False))),
        Reason.BAD_SCT,
    ),
    "wrong-workflow": (
        lambda w: bundles(
            w.sigstore.dsse_bundle(
                statement(IMAGE, REF),
                signer(w, subject="https://github.com/acme/app/.github/workflows/ci.yml@refs/heads/main"),
            )
        ),
        Reason.IDENTITY_MISMATCH,
    ),
    "other-issuer": (
        lambda w: bundles(w.sigstore.dsse_bundle(statement(IMAGE, REF), signer(w, issuer="https://gitlab.com"))),
        Reason.ISSUER_MISMATCH,
    ),
    "provenance-is-not-a-signature": (
        lambda w: bundles(w.sigstore.dsse_bundle(provenance(), signer(w))),
        Reason.WRONG_PREDICATE,
    ),
    "signature-of-another-image": (
        lambda w: bundle_artifact(
            IMAGE,
            OCI_INDEX,
            1,
            [json.dumps(w.sigstore.dsse_bundle(statement(str(Digest.of(b"x")), REF), signer(w))).encode()],
        ),
        Reason.DIGEST_MISMATCH,
    ),
}


@pytest.mark.parametrize(("name", "expected"), [pytest.param(n, e, id=n) for n, (_, e) in NEGATIVES.items()])
async def test_keyless_negative(world: World, name: str, expected: Reason) -> None:
    source = registry(NEGATIVES[name][0](world))
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], world.policy())
    assert not result.allowed
    assert result.keys[0].reason is expected, result.keys[0]


async def test_unrelated_sigstore_is_untrusted(world: World) -> None:
    """Another Fulcio's certificate, signed consistently and logged in its own Rekor."""
    other = FakeSigstore()
    source = registry(bundles(other.dsse_bundle(statement(IMAGE, REF), other.issue())))
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], world.policy())
    assert result.keys[0].reason is Reason.UNTRUSTED_LOG


async def test_timestamp_authority_not_in_root(world: World) -> None:
    root = TrustedRoot.from_json(json.dumps(world.sigstore.trusted_root(with_tsa=False)).encode(), "no tsa")
    doc = world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world), rekor=2, timestamp=T0 + timedelta(minutes=2))
    identity = KeylessIdentity.of(subject=RELEASE, issuer=GITHUB)
    policy = SignaturePolicy({}, 1, None, (identity,), root)
    result = await verify_image(registry(bundles(doc)), REPO, [Digest.parse(IMAGE)], policy)
    assert result.keys[0].reason is Reason.BAD_TIMESTAMP


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ({"sourceRepositoryURI": "https://github.com/acme/*", "buildTrigger": "push"}, None),
        ({"sourceRepositoryURI": "https://github.com/other/*"}, Reason.EXTENSION_MISMATCH),
        ({"buildTrigger": "workflow_dispatch"}, Reason.EXTENSION_MISMATCH),
    ],
)
async def test_extensions(world: World, wanted: dict[str, str], expected: Reason | None) -> None:
    claims = {"sourceRepositoryURI": "https://github.com/acme/app", "buildTrigger": "push"}
    source = registry(bundles(world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world, extensions=claims))))
    identity = KeylessIdentity.of(subject=RELEASE, issuer=GITHUB, extensions=wanted)
    policy = SignaturePolicy({}, 1, None, (identity,), world.root)
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], policy)
    assert result.keys[0].reason is expected


# --- attestations ---------------------------------------------------------------------------
NOW = T0 + timedelta(days=10)


def attestation_policy(
    w: World, conditions: dict[str, str] | None = None, max_age: float | None = None
) -> SignaturePolicy:
    requirements = StatementRequirements({k: Matcher.literal(v) for k, v in (conditions or {}).items()}, max_age)
    identity = KeylessIdentity.of(subject=RELEASE, issuer=GITHUB)
    return SignaturePolicy({}, 1, None, (identity,), w.root, Purpose(SLSA1), requirements)


ATTESTED = {
    "bundle": lambda w, st: bundles(w.sigstore.dsse_bundle(st, signer(w))),
    "legacy-att": lambda w, st: legacy_artifact(
        IMAGE, [w.sigstore.legacy_attestation_layer(st, signer(w))], suffix=".att", media_type=DSSE_MEDIA_TYPE
    ),
}
DAY = 86400.0


@pytest.mark.parametrize("fmt", list(ATTESTED))
@pytest.mark.parametrize(
    ("conditions", "max_age", "expected"),
    [
        ({}, None, None),
        ({"runDetails.builder.id": "https://github.com/actions/runner/*"}, None, None),
        ({"buildDefinition.externalParameters.workflow.repository": "https://github.com/acme/app"}, 30 * DAY, None),
        ({"runDetails.builder.id": "https://github.com/evil/*"}, None, Reason.CONDITION_FAILED),
        ({"runDetails.builder": "x"}, None, Reason.CONDITION_FAILED),  # an object is not a value
        ({"builder.id": "*"}, None, Reason.CONDITION_FAILED),  # SLSA v0.2 path: absent here
        ({}, 1 * DAY, Reason.TOO_OLD),
    ],
)
async def test_attestation(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    conditions: dict[str, str],
    max_age: float | None,
    expected: Reason | None,
) -> None:
    source = registry(ATTESTED[fmt](world, provenance()))
    policy = attestation_policy(world, conditions, max_age)
    signatures_then = await verify_image(source, REPO, [Digest.parse(IMAGE)], world.policy())
    assert not signatures_then.allowed, "an attestation does not count as a signature"
    real = verification.evaluate
    monkeypatch.setattr(verification, "evaluate", lambda *a: real(*a, now=NOW))
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], policy)
    assert result.keys[0].reason is expected, result.keys[0]
    if expected is None:
        assert json.loads(result.payloads[0])["predicateType"] == SLSA1
    else:
        assert "wanted" in result.message("attestations") or "older than" in result.message("attestations")


async def test_signature_bundle_is_not_an_attestation(world: World) -> None:
    source = registry(bundles(world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world))))
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], attestation_policy(world))
    assert result.keys[0].reason is Reason.WRONG_PREDICATE


# --- keys and identities together -----------------------------------------------------------
@pytest.mark.parametrize(("keyed", "keyless", "threshold", "allowed"), [
    (True, True, 2, True), (False, True, 2, False), (True, False, 1, True), (False, True, 1, True),
])  # fmt: skip
async def test_keys_and_identities_count_toward_threshold(
    world: World, keyed: bool, keyless: bool, threshold: int, allowed: bool
) -> None:
    key = generate_key()
    artifacts = []
    if keyed:
        artifacts.append(sign_legacy(IMAGE, REF, [key]))
    if keyless:
        artifacts.append(bundles(world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world))))
    identity = KeylessIdentity.of(subject=RELEASE, issuer=GITHUB)
    policy = SignaturePolicy.from_pem(
        {"ci": key.public_pem}, threshold=threshold, identities=[identity], trusted_root=world.root
    )
    result = await verify_image(registry(*artifacts), REPO, [Digest.parse(IMAGE)], policy)
    assert result.allowed is allowed, result.message()
    assert f"{len(result.verified_keys)} of {threshold}" in result.message()


# --- the verification service ---------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.lookups: list[bool] = []
        self.results: list[tuple[str, VerificationResult, float]] = []
        self.errors: list[str] = []

    def cache_lookup(self, hit: bool) -> None:
        self.lookups.append(hit)

    def verified(self, subject: Subject, result: VerificationResult, seconds: float) -> None:
        self.results.append((subject.describe(), result, seconds))

    def failed(self, subject: Subject, error: PullgateError) -> None:
        self.errors.append(error.message)


class SlowRegistry(MemoryRegistry):
    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        await asyncio.sleep(0.01)
        return await super().get_manifest(repository, reference)


async def test_service_caches_and_shares_one_verification(world: World) -> None:
    source = SlowRegistry()
    source.push(REPO, SIGNED["legacy"](world))
    recorder = Recorder()
    service, cache, policy = VerificationService(recorder), VerificationCache(), world.policy()
    subject = Subject(source, REPO, Digest.parse(IMAGE))
    results = await asyncio.gather(*(service.verify(subject, policy, cache) for _ in range(10)))
    assert all(r.allowed for r in results)
    assert len(recorder.results) == 1, "ten concurrent askers, one verification"
    requests = len(source.requests)
    warm = await service.verify(subject, policy, cache)
    # A cache hit: the same result object, not one registry request (its speed is a
    # benchmark's business, not a unit test's).
    assert warm is results[0] and len(source.requests) == requests
    assert recorder.lookups.count(True) >= 1
    found = recorder.results[0][1].keys[0].identity
    assert found is not None and (found.subject, found.issuer) == (WORKFLOW, GITHUB)


async def test_service_candidates_include_the_index(world: World) -> None:
    """A signature on the multi-arch index counts for a platform manifest it lists."""
    index = str(Digest.of(b"the index"))
    artifact = legacy_artifact(index, [world.sigstore.legacy_layer(index, REF, signer(world))])
    subject = Subject(registry(artifact), REPO, Digest.parse(IMAGE), (Digest.parse(index),))
    result = await VerificationService().verify(subject, world.policy(), VerificationCache())
    assert result.allowed


class FailingRegistry(MemoryRegistry):
    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        raise UpstreamUnavailable("upstream down")


async def test_service_errors_propagate_and_are_observed(world: World) -> None:
    recorder = Recorder()
    subject = Subject(FailingRegistry(), REPO, Digest.parse(IMAGE))
    with pytest.raises(UpstreamUnavailable):
        await VerificationService(recorder).verify(subject, world.policy(), VerificationCache())
    assert recorder.errors == ["upstream down"]


async def test_one_asker_timing_out_does_not_cancel_the_others(world: World) -> None:
    source = SlowRegistry()
    source.push(REPO, SIGNED["bundle-rekor-v1"](world))
    service, cache, policy = VerificationService(), VerificationCache(), world.policy()
    subject = Subject(source, REPO, Digest.parse(IMAGE))
    patient = asyncio.ensure_future(service.verify(subject, policy, cache))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.005):
            await service.verify(subject, policy, cache)
    assert (await patient).allowed


def test_signature_policy_purpose_default() -> None:
    assert SIGNATURE.predicate_type is None


async def test_one_certificate_counts_once_toward_the_threshold(world: World) -> None:
    """Two overlapping identities, one keyless signature: not two signers."""
    source = registry(bundles(world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world))))
    identities = [
        KeylessIdentity.of(subject=RELEASE, issuer=GITHUB),
        KeylessIdentity.of(subject="https://github.com/acme/**", issuer=GITHUB),
    ]
    policy = SignaturePolicy({}, 2, None, tuple(identities), world.root)
    result = await verify_image(source, REPO, [Digest.parse(IMAGE)], policy)
    assert not result.allowed and result.verified_keys == (RELEASE,)
    assert result.keys[1].reason is Reason.ALREADY_COUNTED
    second = bundles(
        world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world)),
        world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world)),
    )
    assert (await verify_image(registry(second), REPO, [Digest.parse(IMAGE)], policy)).allowed


async def test_many_log_entries_are_capped(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream padding a bundle with log entries cannot make verification cost seconds:
    at most MAX_PER_OBJECT of them are even parsed (counted, not timed: a shared machine's
    timings prove nothing)."""
    doc = world.sigstore.dsse_bundle(statement(IMAGE, REF), signer(world))
    entry = doc["verificationMaterial"]["tlogEntries"][0]
    # Padding indexes that cannot be the real entry's (a fresh log starts at 0: run alone,
    # one copy was the real entry and verified).
    padding = [{**entry, "logIndex": str(int(entry["logIndex"]) + 1 + i)} for i in range(1000)]
    doc["verificationMaterial"]["tlogEntries"] = [*padding, entry]
    parsed: list[object] = []
    parse = rekor.from_bundle_entry
    monkeypatch.setattr(rekor, "from_bundle_entry", lambda item: parsed.append(item) or parse(item))
    result = await verify_image(registry(bundles(doc)), REPO, [Digest.parse(IMAGE)], world.policy())
    assert 0 < len(parsed) <= MAX_PER_OBJECT
    assert result.keys[0].reason is Reason.UNTRUSTED_LOG, "only the first entries are read; their SETs do not verify"
