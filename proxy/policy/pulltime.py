"""Pull-time content trust (``mirror.enforce_policies: true``): the mirror refuses to serve
a manifest of a policy-covered image whose signatures do not verify, so runtimes pulling
through the mirror outside Kubernetes get the admission webhook's guarantee.

At pull time there is no pod and no namespace: policies restricted by
``match.namespaces`` do not apply here, and only ``signatures`` rules are enforced (a
runtime resolving a tag is not "using a tag" the way a pod spec is). ``enforce`` policies
deny with ``403 DENIED`` and the reason; ``warn``/``audit`` ones log the violation.

For a platform manifest pulled by digest, a signature on an index of the same repository
that lists it counts (cosign signs the index a multi-arch tag names). Signature objects
themselves are exempt — decided by what they are (``proxy.oci.artifacts``), never by the
tag they were pushed under or an annotation (issue 13: an unsigned image tagged
``sha256-<hex>.sig``, or annotated with the bundle media type, was served). An artifact is
exempt only once its layers' bytes, read through the cache, are signature documents:
containers/image unpacks any layer bytes under an image config, whatever their media type.
"""

from __future__ import annotations

import asyncio

import structlog
from cachetools import LRUCache

from proxy.errors import Denied, PullgateError
from proxy.oci.artifacts import Kind, classify, payload_matches
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import Descriptor
from proxy.oci.reference import ImageReference
from proxy.policy.active import PolicyStore
from proxy.policy.document import Policy
from proxy.policy.rules.signature import Signatures
from proxy.policy.verifier import verification_service
from proxy.registry.manifests import Manifest
from proxy.registry.mirror import Mirror
from proxy.registry.routing import Route
from proxy.trust.service import Subject
from proxy.trust.verification import VerificationResult

_EXEMPT_MEMORY = 4096  # manifest digests known to be signature objects (content never changes)


class PullPolicy:
    def __init__(self, mirror: Mirror, policies: PolicyStore, timeout: float) -> None:
        self._mirror = mirror
        self._policies = policies
        self._timeout = timeout
        self._exempt: LRUCache[Digest, bool] = LRUCache(_EXEMPT_MEMORY)
        self._log = structlog.get_logger("pullgate.pullpolicy")
        self._verifier = verification_service(mirror.metrics)

    async def check(self, route: Route, reference: str, manifest: Manifest) -> None:
        """Raise ``Denied`` unless every enforcing policy's signatures verify. ``reference``
        (the tag or digest asked for) plays no part: a tag says nothing about the content."""
        if await self._is_signature_object(route, manifest):
            return
        current = self._policies.current
        if current is None:
            raise Denied("image policies are not loaded yet; pulls of covered images are refused")
        # Policies name images by registry host, not by the upstream's configured name.
        ref = ImageReference(self._mirror.router.registry(route.upstream), route.repository, None, manifest.digest)
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
        """The one verification service the webhook uses too: same candidates (the digest
        and the indexes listing it), same cache, single flight and metrics."""
        related = await self._mirror.catalog.parents(route.upstream, route.repository, digest)
        subject = Subject(self._mirror.content_of(route.upstream), route.repository, digest, tuple(related))
        try:
            async with asyncio.timeout(self._timeout):
                return await self._verifier.verify(subject, rule.policy, rule.cache)
        except TimeoutError as exc:
            raise Denied("signature verification timed out; the pull is refused") from exc
        except PullgateError as exc:
            raise Denied(f"signature verification failed: {exc.message}") from exc

    async def _is_signature_object(self, route: Route, manifest: Manifest) -> bool:
        """Exempt from the signature requirement: a signature or attestation artifact, by
        structure and by the content of its layers (remembered per digest: it never changes)."""
        if self._exempt.get(manifest.digest):
            return True
        artifact = classify(manifest.data, manifest.media_type)
        if artifact.kind is Kind.IMAGE:
            return False
        if artifact.inspect and not await self._payloads_match(route, artifact.inspect):
            return False
        self._exempt[manifest.digest] = True
        return True

    async def _payloads_match(self, route: Route, layers: tuple[Descriptor, ...]) -> bool:
        source = self._mirror.content_of(route.upstream)
        try:
            async with asyncio.timeout(self._timeout):
                for layer in layers:
                    data = await source.get_blob(route.repository, layer.digest)
                    if data is None or not payload_matches(layer.media_type, data):
                        layer_digest = str(layer.digest)
                        self._log.warning("pull_exemption_refused", repository=route.repository, layer=layer_digest)
                        return False
        except (TimeoutError, PullgateError) as exc:
            # Not shown to be a signature: judged as an image (which then needs a signature).
            self._log.warning("pull_exemption_unchecked", repository=route.repository, error=exc.__class__.__name__)
            return False
        return True
