"""The verification service as the webhook and pull-time enforcement use it: one
``VerificationService`` whose results become metrics and log events here (``proxy.trust``
imports neither).

Metric labels stay bounded: the signer is the policy's key name or keyless identity, the
issuer the one the policy wants. The identity a certificate actually names (attacker
controlled on a failure) goes only into log events.
"""

from __future__ import annotations

import structlog
from structlog.typing import FilteringBoundLogger

from proxy.errors import PullgateError
from proxy.ops.metrics import Metrics
from proxy.trust.service import Subject, VerificationService
from proxy.trust.verification import VerificationResult


class MetricsObserver:
    def __init__(self, metrics: Metrics | None, log: FilteringBoundLogger | None = None) -> None:
        self.metrics = metrics
        self.log: FilteringBoundLogger = log or structlog.get_logger("pullgate.verification")

    def cache_lookup(self, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.verification_cache.labels("hit" if hit else "miss").inc()

    def verified(self, subject: Subject, result: VerificationResult, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.verification_seconds.observe(seconds)
        for signer in result.keys:
            outcome = "verified" if signer.verified else "failed"
            if self.metrics is not None:
                self.metrics.verifications.labels(outcome, signer.name, signer.issuer).inc()
            found = signer.identity
            self.log.info(
                "signature_verified" if signer.verified else "signature_rejected",
                image=subject.describe(),
                signer=signer.name,
                result=outcome,
                reason=str(signer.reason) if signer.reason else None,
                identity=found.subject if found else None,
                issuer=found.issuer if found else None,
                wanted_issuer=signer.issuer or None,
                allowed=result.allowed,
                seconds=round(seconds, 4),
            )

    def failed(self, subject: Subject, error: PullgateError) -> None:
        if self.metrics is not None:
            self.metrics.verifications.labels("error", "", "").inc()
        self.log.warning("signature_verification_failed", image=subject.describe(), error=error.message)


def verification_service(metrics: Metrics | None, log: FilteringBoundLogger | None = None) -> VerificationService:
    return VerificationService(MetricsObserver(metrics, log))
