"""Pull-time content trust (``mirror.enforce_policies: true``): the mirror refuses to serve
a manifest of a policy-covered image whose signatures do not verify, so runtimes pulling
through the mirror outside Kubernetes get the admission webhook's guarantee.

At pull time there is no pod and no namespace: policies restricted by
``match.namespaces`` do not apply here, and only ``signatures`` rules are enforced (a
runtime resolving a tag is not "using a tag" the way a pod spec is). ``enforce`` policies
deny with ``403 DENIED`` and the reason; ``warn``/``audit`` ones log the violation.

For a platform manifest pulled by digest, a signature on an index of the same repository
that lists it counts (cosign signs the index a multi-arch tag names). Signature objects
themselves (``sha256-<hex>.sig`` tags, sigstore bundles) are exempt.
"""

from __future__ import annotations

import asyncio
import re

import structlog

from proxy.errors import Denied, PullgateError
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import parse_manifest
from proxy.oci.reference import ImageReference
from proxy.policy.active import PolicyStore
from proxy.policy.document import Policy
from proxy.policy.rules.signature import Signatures
from proxy.registry.manifests import Manifest
from proxy.registry.mirror import Mirror
from proxy.registry.routing import Route
from proxy.trust.verification import VerificationResult, verify_image

_SIGNATURE_TAG = re.compile(r"^sha256-[0-9a-f]{64}(\.(sig|att|sbom))?$")
_SIGNATURE_TYPES = ("application/vnd.dev.cosign", "application/vnd.dev.sigstore")


class PullPolicy:
    def __init__(self, mirror: Mirror, policies: PolicyStore, timeout: float) -> None:
        self._mirror = mirror
        self._policies = policies
        self._timeout = timeout
        self._log = structlog.get_logger("pullgate.pullpolicy")

    async def check(self, route: Route, reference: str, manifest: Manifest) -> None:
        """Raise ``Denied`` unless every enforcing policy's signatures verify."""
        if _SIGNATURE_TAG.match(reference) or _is_signature_object(manifest):
            return
        current = self._policies.current
        if current is None:
            raise Denied("image policies are not loaded yet; pulls of covered images are refused")
        ref = ImageReference(route.upstream, route.repository, None, manifest.digest)
        for policy in current.matching(ref, ""):
            for rule in policy.rules:
                if isinstance(rule, Signatures):
                    await self._judge(policy, rule, route, ref)

    async def _judge(self, policy: Policy, rule: Signatures, route: Route, ref: ImageReference) -> None:
        assert ref.digest is not None
        result = await self._verify(route, ref.digest, rule)
        if result.allowed:
            return
        reason = result.message()
        log = self._log.bind(policy=policy.name, image=str(ref), reason=reason)
        if policy.mode != "enforce":
            log.warning(f"pull_policy_{policy.mode}")
            return
        log.warning("pull_denied")
        raise Denied(f"image {ref}: policy {policy.name} requires a valid signature: {reason}")

    async def _verify(self, route: Route, digest: Digest, rule: Signatures) -> VerificationResult:
        cached = rule.cache.get(digest)
        metrics = self._mirror.metrics
        metrics.verification_cache.labels("hit" if cached else "miss").inc()
        if cached is not None:
            return cached
        candidates = (digest, *await self._mirror.catalog.parents(route.upstream, route.repository, digest))
        source = self._mirror.content_of(route.upstream)
        try:
            async with asyncio.timeout(self._timeout):
                result = await verify_image(source, route.repository, candidates, rule.policy)
        except TimeoutError as exc:
            raise Denied("signature verification timed out; the pull is refused") from exc
        except PullgateError as exc:
            raise Denied(f"signature verification failed: {exc.message}") from exc
        for key in result.keys:
            metrics.verifications.labels("verified" if key.reason is None else "failed", key.name).inc()
        rule.cache.put(digest, result)
        return result


def _is_signature_object(manifest: Manifest) -> bool:
    try:
        parsed = parse_manifest(manifest.data, manifest.media_type)
    except PullgateError:
        return False
    types = [d.media_type for d in parsed.children]
    return any(t.startswith(_SIGNATURE_TYPES) for t in types) or b'"application/vnd.dev.sigstore' in manifest.data
