"""What the ``image`` rules of the policy set say about one image, outside an admission
review: for ``pullgate cache inspect`` (which rules a cached image would fail) and other
operator tools. Kept apart from ``proxy.policy.rules.image`` because it needs the evaluator's
``Facts``, and ``proxy.policy.evaluation`` imports the rule registry."""

from __future__ import annotations

from proxy.oci.reference import ImageReference
from proxy.policy.active import PolicySet
from proxy.policy.document import Policy
from proxy.policy.evaluation import ContentProvider, Facts, Resolutions, TagResolver
from proxy.policy.rules.base import ImageContext
from proxy.policy.rules.image import ImageRules


async def image_findings(
    policies: PolicySet,
    content: ContentProvider,
    resolver: TagResolver | None,
    ref: ImageReference,
    namespace: str | None = None,
) -> list[str]:
    """Violations of every ``image`` rule block of the policies matching ``ref`` (in any
    namespace unless ``namespace`` is given), as ``policy NAME (MODE) PHRASE`` lines, e.g.
    ``policy hygiene (enforce) image.denyRootUser: runs as root (image sets no user)``.
    Empty when every such rule passes or none applies. The image is judged as a container
    without a securityContext would run it. ``resolver`` is needed only for a tag without
    a digest (the mirror itself is one)."""
    ref = policies.canonical(ref)
    resolutions = Resolutions(resolver)
    try:
        facts = Facts(ref, resolutions, content)
        context = ImageContext(f'image "{ref}"', str(ref), ref, namespace or "", facts, ref.digest is not None)
        return [
            f"policy {policy.name} ({policy.mode}) {phrase}"
            for policy in policies.policies
            if _applies(policy, ref, namespace)
            for rule in policy.rules
            if isinstance(rule, ImageRules)
            for phrase in await rule.check(context)
        ]
    finally:
        resolutions.close()


def _applies(policy: Policy, ref: ImageReference, namespace: str | None) -> bool:
    if namespace is not None:
        return policy.applies(ref, namespace)
    return policy.match.images.match(ref.name) and not policy.match.exclude_images.match(ref.name)
