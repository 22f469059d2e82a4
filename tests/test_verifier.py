"""The verification service as the webhook and pull-time enforcement wire it
(proxy.policy.verifier): results become metrics (bounded labels: the policy's signer and
wanted issuer) and log events (the identity and issuer actually found)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from proxy.errors import UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.ops.metrics import Metrics
from proxy.policy.verifier import verification_service
from proxy.trust.cosign import Reason
from proxy.trust.identity import KeylessIdentity
from proxy.trust.service import Subject, VerificationCache
from proxy.trust.trustroot import TrustedRoot
from proxy.trust.verification import KeyResult, SignaturePolicy, VerificationResult
from tests.signer import MemoryRegistry, legacy_artifact
from tests.sigstore_fakes import GITHUB, WORKFLOW, FakeSigstore

IMAGE = str(Digest.of(b"image"))
WANTED = "https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*"


async def test_results_become_metrics_and_log_events() -> None:
    sigstore = FakeSigstore()
    source = MemoryRegistry()
    source.push(
        "acme/app", legacy_artifact(IMAGE, [sigstore.legacy_layer(IMAGE, "ghcr.io/acme/app", sigstore.issue())])
    )
    root = TrustedRoot.from_json(json.dumps(sigstore.trusted_root()).encode(), "fake")
    good = KeylessIdentity.of(subject=WANTED, issuer=GITHUB)
    bad = KeylessIdentity.of(subject="https://github.com/other/*", issuer=GITHUB, name="other-org")
    policy = SignaturePolicy({}, 1, None, (good, bad), root)
    metrics = Metrics(CollectorRegistry())
    service = verification_service(metrics)
    cache = VerificationCache()
    subject = Subject(source, "acme/app", Digest.parse(IMAGE))
    with capture_logs() as logs:
        first = await service.verify(subject, policy, cache)
        second = await service.verify(subject, policy, cache)
    assert first.allowed and second is first
    registry = metrics.registry
    assert registry.get_sample_value("pullgate_signature_verification_cache_total", {"result": "miss"}) == 1
    assert registry.get_sample_value("pullgate_signature_verification_cache_total", {"result": "hit"}) == 1
    verified = {"result": "verified", "key": WANTED, "issuer": GITHUB}
    failed = {"result": "failed", "key": "other-org", "issuer": GITHUB}
    assert registry.get_sample_value("pullgate_signature_verifications_total", verified) == 1
    assert registry.get_sample_value("pullgate_signature_verifications_total", failed) == 1
    assert registry.get_sample_value("pullgate_signature_verification_duration_seconds_count") == 1
    events = {e["signer"]: e for e in logs if e["event"] in ("signature_verified", "signature_rejected")}
    assert events[WANTED]["event"] == "signature_verified"
    assert (events[WANTED]["identity"], events[WANTED]["issuer"], events[WANTED]["result"]) == (
        WORKFLOW,
        GITHUB,
        "verified",
    )
    assert events["other-org"]["event"] == "signature_rejected"
    assert events["other-org"]["reason"] == "certificate identity mismatch"
    assert events["other-org"]["identity"] == WORKFLOW, "the identity found, for the operator reading the log"


class Down(MemoryRegistry):
    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        raise UpstreamUnavailable("upstream down")


async def test_errors_are_counted_and_logged() -> None:
    metrics = Metrics(CollectorRegistry())
    root = TrustedRoot.from_json(json.dumps(FakeSigstore().trusted_root()).encode(), "fake")
    policy = SignaturePolicy({}, 1, None, (KeylessIdentity.of(subject=WANTED, issuer=GITHUB),), root)
    subject = Subject(Down(), "a/b", Digest.parse(IMAGE))
    with capture_logs() as logs, pytest.raises(UpstreamUnavailable):
        await verification_service(metrics).verify(subject, policy, VerificationCache())
    labels = {"result": "error", "key": "", "issuer": ""}
    assert metrics.registry.get_sample_value("pullgate_signature_verifications_total", labels) == 1
    assert [e["event"] for e in logs] == ["signature_verification_failed"]


@pytest.mark.parametrize(("allowed", "ttl_left_after_31s"), [(True, True), (False, False)])
def test_verification_cache_ttls_and_bound(allowed: bool, ttl_left_after_31s: bool) -> None:
    """Successes live for ``ttl``, failures for ``failure_ttl``; a full cache drops its least
    recently used result, never everything at once."""
    now = [0.0]
    cache = VerificationCache(ttl=600, failure_ttl=30, max_entries=3, clock=lambda: now[0])
    result = VerificationResult((KeyResult("k", None if allowed else Reason.BAD_SIGNATURE),), threshold=1)
    digests = [Digest.of(bytes([i])) for i in range(4)]
    for digest in digests[:3]:
        cache.put(digest, result)
    assert cache.get(digests[0]) is result  # used: the least recently used is now digests[1]
    cache.put(digests[3], result)
    assert cache.get(digests[1]) is None
    assert all(cache.get(d) is result for d in (digests[0], digests[2], digests[3]))
    now[0] += 31
    assert (cache.get(digests[0]) is result) is ttl_left_after_31s
