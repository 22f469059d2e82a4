"""Judging images against the policy set: per image, every matching policy's rules, the
``defaults.no_match`` fallback, and the mutations (tag pinning, registry rewrite).

Shared by the webhook (live, with the mirror as ``TagResolver``) and ``pullgate policy
check`` (offline: no resolver, tags that ``resolveTags`` would pin count as pinned).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

from proxy.errors import (
    Denied,
    ManifestUnknown,
    NameUnknown,
    PullgateError,
    Unauthorized,
    UpstreamDenied,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import parse_manifest, pick_platform
from proxy.oci.reference import ImageReference
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicySet
from proxy.policy.document import Policy
from proxy.policy.rules.base import DEFAULT_PLATFORM, ImageContext, ManifestDoc, ResolutionFailed
from proxy.policy.sites import ImageSite, clip
from proxy.policy.verifier import verification_service
from proxy.trust.service import Subject, VerificationCache, VerificationService
from proxy.trust.verification import SignaturePolicy, SignatureSource, VerificationResult

_T = TypeVar("_T")

Outcome = Literal["allow", "warn", "audit", "deny"]
NoMatch = Literal["allow", "warn", "deny"]
_OUTCOME_BY_MODE: Mapping[str, Outcome] = {"enforce": "deny", "warn": "warn", "audit": "audit"}


class ResolvedTag(Protocol):
    """What a resolution returns (any object with these attributes)."""

    @property
    def digest(self) -> Digest: ...

    @property
    def source(self) -> Literal["cache", "upstream"]: ...


class TagResolver(Protocol):
    """The mirror's side of the seam: resolve ``ref`` (which has a tag and no digest) to the
    manifest digest, from the cache while fresh (``cache.tag_ttl``), else upstream.

    Raises ``ManifestUnknown`` (tag not found), ``NameUnknown`` (no upstream for the
    registry), ``UpstreamUnavailable``, ``UpstreamDenied`` or another ``PullgateError``."""

    async def resolve(self, ref: ImageReference) -> ResolvedTag: ...


def failure_reason(exc: PullgateError, ref: ImageReference) -> str:
    """Why a tag did not resolve, in words an operator can act on."""
    if isinstance(exc, ManifestUnknown):
        return f"tag {ref.tag} not found in {ref.name}"
    if isinstance(exc, NameUnknown):
        return f"the mirror has no upstream for {ref.registry}"
    if isinstance(exc, UpstreamDenied | Unauthorized | Denied):
        return f"upstream {ref.registry} refused access (auth): {exc.message}"
    if isinstance(exc, UpstreamRateLimited):
        return f"upstream {ref.registry} rate-limited us"
    if isinstance(exc, UpstreamUnavailable):
        return f"upstream {ref.registry} unreachable: {exc.message}"
    return f"{exc.message} ({exc.code})"


class Resolutions:
    """Tag resolutions for one review: each distinct tag resolved once, concurrently."""

    def __init__(self, resolver: TagResolver | None, metrics: Metrics | None = None) -> None:
        self.resolver = resolver
        self.metrics = metrics
        self._tasks: dict[ImageReference, asyncio.Task[ResolvedTag]] = {}
        self._memo: dict[Hashable, asyncio.Future[Any]] = {}
        self.sources: dict[ImageReference, str] = {}

    async def resolve(self, ref: ImageReference) -> ResolvedTag:
        key = ImageReference(ref.registry, ref.repository, ref.tag)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.ensure_future(self._resolve(key))
        return await task

    async def _resolve(self, ref: ImageReference) -> ResolvedTag:
        if self.resolver is None:
            raise ResolutionFailed("tag resolution is not available offline")
        try:
            resolution = await self.resolver.resolve(ref)
        except PullgateError as exc:
            self._count(ref, "failed")
            raise ResolutionFailed(failure_reason(exc, ref)) from exc
        except (OSError, TimeoutError) as exc:  # a resolver that let a network error through
            self._count(ref, "failed")
            raise ResolutionFailed(f"upstream {ref.registry} unreachable: {exc!r}") from exc
        self._count(ref, resolution.source)
        return resolution

    async def memo(self, key: Hashable, fetch: Callable[[], Awaitable[_T]]) -> _T:
        """``fetch()`` once per review for ``key``; concurrent askers share the result."""
        task = self._memo.get(key)
        if task is None:
            task = self._memo[key] = asyncio.ensure_future(fetch())
        return cast(_T, await task)

    def _count(self, ref: ImageReference, source: str) -> None:
        self.sources[ref] = source
        if self.metrics is not None:
            self.metrics.tag_resolutions.labels(source=source).inc()

    def close(self) -> None:
        for task in [*self._tasks.values(), *self._memo.values()]:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" noise for failures


class ContentProvider(Protocol):
    """The mirror's content side of the seam: manifests, blobs and referrers of the
    upstream ``ref`` belongs to, through the cache."""

    def content(self, ref: ImageReference) -> SignatureSource: ...

    async def parents(self, ref: ImageReference, digest: Digest) -> Sequence[Digest]:
        """Indexes of ``ref``'s repository known to list ``digest`` (their signatures count)."""
        ...


@dataclass(frozen=True, slots=True)
class Facts:
    """``ImageFacts`` for one reference, sharing the review's ``Resolutions`` (so each
    manifest, config and verification is fetched once per review, however many rules ask)."""

    ref: ImageReference
    resolutions: Resolutions
    content: ContentProvider | None = None
    metrics: Metrics | None = None
    verifier: VerificationService | None = None

    async def digest(self) -> Digest:
        if self.ref.digest is not None:
            return self.ref.digest
        return (await self.resolutions.resolve(self.ref)).digest

    def _source(self) -> SignatureSource:
        if self.content is None:
            raise ResolutionFailed("image content is not available (no mirror cache)")
        try:
            return self.content.content(self.ref)
        except PullgateError as exc:
            raise ResolutionFailed(failure_reason(exc, self.ref)) from exc

    async def manifest(self, digest: Digest | None = None) -> ManifestDoc:
        """The manifest the reference names (or ``digest`` in the same repository)."""
        wanted = digest or await self.digest()
        return await self.resolutions.memo(("manifest", self.ref.name, wanted), lambda: self._manifest(wanted))

    async def _manifest(self, digest: Digest) -> ManifestDoc:
        try:
            found = await self._source().get_manifest(self.ref.repository, str(digest))
        except PullgateError as exc:
            raise ResolutionFailed(failure_reason(exc, self.ref)) from exc
        if found is None:
            raise ResolutionFailed(f"manifest {digest} not found in {self.ref.name}")
        data, media_type = found
        return ManifestDoc(digest, media_type, data, parse_manifest(data, media_type))

    async def image_manifest(self, platform: str = DEFAULT_PLATFORM) -> ManifestDoc:
        """The single-platform manifest that will run: the index entry for ``platform``,
        or the manifest itself when it is not an index."""
        top = await self.manifest()
        if not top.parsed.is_index:
            return top
        entry = pick_platform(top.parsed, platform)
        if entry is None:
            raise ResolutionFailed(f"{self.ref.name} has no {platform} image")
        return await self.manifest(entry.digest)

    async def blob(self, digest: Digest) -> bytes:
        """A small blob (config, payload) of the image's repository."""
        return await self.resolutions.memo(("blob", self.ref.name, digest), lambda: self._blob(digest))

    async def _blob(self, digest: Digest) -> bytes:
        try:
            data = await self._source().get_blob(self.ref.repository, digest)
        except PullgateError as exc:
            raise ResolutionFailed(failure_reason(exc, self.ref)) from exc
        if data is None:
            raise ResolutionFailed(f"blob {digest} not found in {self.ref.name}")
        return data

    async def config(self, platform: str = DEFAULT_PLATFORM) -> dict[str, Any]:
        """The image config (``config.User``, ``Env``, ``history``, ``created``, ...)."""
        image = await self.image_manifest(platform)
        data = await self.blob(image.parsed.children[0].digest)
        return jsondoc.parse_object(data, f"config of {self.ref.name}", error=ResolutionFailed)

    async def signatures(self, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        """Verify the image's signatures (or attestations) against ``policy`` through the
        one verification service (cached by digest, shared with pull-time enforcement)."""
        digest = await self.digest()
        return await self.resolutions.memo(
            ("signatures", id(cache), digest), lambda: self._verify(digest, policy, cache)
        )

    async def _verify(self, digest: Digest, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        source = self._source()
        try:
            assert self.content is not None  # _source() checked
            related = await self.content.parents(self.ref, digest)
            subject = Subject(source, self.ref.repository, digest, tuple(related))
            verifier = self.verifier or verification_service(self.metrics)
            return await verifier.verify(subject, policy, cache)
        except PullgateError as exc:
            raise ResolutionFailed(failure_reason(exc, self.ref)) from exc


@dataclass(frozen=True, slots=True)
class Decision:
    site: ImageSite
    policy: str | None  # None: no policy matched, or the reference is invalid
    mode: str  # enforce | warn | audit, or "default" for defaults.no_match
    rule: str | None  # None when the image passed
    outcome: Outcome
    message: str = ""


@dataclass(frozen=True, slots=True)
class ImageResult:
    site: ImageSite
    decisions: tuple[Decision, ...]
    new_image: str | None = None  # what the mutation writes, when it changes the image
    resolution: str | None = None  # cache | upstream | failed, when a tag was resolved


@dataclass(frozen=True, slots=True)
class Evaluation:
    results: tuple[ImageResult, ...]

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(d for r in self.results for d in r.decisions)

    def messages(self, outcome: Outcome) -> list[str]:
        return [d.message for d in self.decisions if d.outcome == outcome]

    @property
    def allowed(self) -> bool:
        return not any(d.outcome == "deny" for d in self.decisions)

    def warnings(self) -> list[str]:
        return [clip(m) for m in self.messages("warn")]

    def audit_annotations(self) -> dict[str, str]:
        notes: dict[str, list[str]] = {}
        for d in self.decisions:
            if d.outcome == "audit" and d.policy is not None:
                notes.setdefault(d.policy, []).append(d.message)
        return {policy: "; ".join(messages) for policy, messages in notes.items()}

    def patch(self) -> list[dict[str, str]]:
        return [
            {"op": "replace", "path": r.site.pointer, "value": r.new_image}
            for r in self.results
            if r.new_image is not None
        ]


@dataclass(frozen=True, slots=True)
class _Pin:
    ref: ImageReference
    pinned: bool
    error: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Evaluator:
    policies: PolicySet
    no_match: NoMatch = "allow"
    resolver: TagResolver | None = None
    metrics: Metrics | None = None
    content: ContentProvider | None = None
    verifier: VerificationService | None = None  # default: one reporting to ``metrics``

    async def evaluate(self, sites: tuple[ImageSite, ...], namespace: str, *, mutate: bool) -> Evaluation:
        """Judge every site. With ``mutate``, pin tags (``resolveTags``) and rewrite hosts
        (``rewriteRegistry``), judging the image as it will run."""
        resolutions = Resolutions(self.resolver, self.metrics)
        try:
            if len(sites) == 1:
                results = [await self._image(sites[0], namespace, mutate, resolutions)]
            else:
                results = await asyncio.gather(*(self._image(s, namespace, mutate, resolutions) for s in sites))
        finally:
            resolutions.close()
        return Evaluation(tuple(results))

    async def _image(self, site: ImageSite, namespace: str, mutate: bool, resolutions: Resolutions) -> ImageResult:
        try:
            ref = self.policies.canonical(ImageReference.parse(site.image))
        except PullgateError as exc:
            message = f"{site.describe()}: invalid image reference: {exc.message}"
            return ImageResult(site, (Decision(site, None, "enforce", "reference", "deny", message),))
        matching = self.policies.matching(ref, namespace)
        if not matching:
            return ImageResult(site, (self._no_match(site),))
        pin = await self._pin(ref, matching, mutate, resolutions)
        context = ImageContext(
            site.describe(),
            site.image,
            pin.ref,
            namespace,
            Facts(pin.ref, resolutions, self.content, self.metrics, self.verifier),
            pin.pinned,
            pin.error,
            site.run_as_user,
            site.run_as_non_root,
            runs=site.field != "volumes",
        )
        decisions = [d for p in matching for d in await self._check(p, context, site)]
        new_image = _mutated(site, pin.ref, matching) if mutate else None
        return ImageResult(site, tuple(decisions), new_image, pin.source)

    def _no_match(self, site: ImageSite) -> Decision:
        if self.no_match == "allow":
            return Decision(site, None, "default", None, "allow")
        message = f"{site.describe()}: no policy matches (defaults.no_match: {self.no_match})"
        return Decision(site, None, "default", "no_match", self.no_match, message)

    async def _pin(self, ref: ImageReference, matching: tuple[Policy, ...], mutate: bool, res: Resolutions) -> _Pin:
        if ref.digest is not None:
            return _Pin(ref, True)
        if not mutate or not any(p.resolve_tags for p in matching):
            return _Pin(ref, False)
        if self.resolver is None:  # offline preview: the webhook would pin it
            return _Pin(ref, True, source="offline")
        try:
            resolution = await res.resolve(ref)
        except ResolutionFailed as exc:
            return _Pin(ref, False, exc.reason, "failed")
        return _Pin(ref.with_digest(resolution.digest), True, source=resolution.source)

    @staticmethod
    async def _check(policy: Policy, context: ImageContext, site: ImageSite) -> list[Decision]:
        outcome = _OUTCOME_BY_MODE[policy.mode]
        decisions = [
            Decision(
                site, policy.name, policy.mode, rule.name, outcome, f"{site.describe()}: policy {policy.name} {phrase}"
            )
            for rule in policy.rules
            for phrase in await rule.check(context)
        ]
        return decisions or [Decision(site, policy.name, policy.mode, None, "allow")]


def _mutated(site: ImageSite, ref: ImageReference, matching: tuple[Policy, ...]) -> str | None:
    """The image text after mutation, or None when it stays as written. Idempotent: an
    image already pinned (and moved) maps to itself."""
    mirror = next((p.rewrite_registry for p in matching if p.rewrite_registry), None)
    # A host with a port ("localhost:5000") cannot become a path component on the mirror.
    if mirror is not None and ref.registry != mirror and ":" not in ref.registry:
        text = str(ImageReference(mirror, f"{ref.registry}/{ref.repository}", ref.tag, ref.digest))
    elif ref.digest is not None and "@" not in site.image:
        text = pin_text(site.image, ref.digest)
    else:
        return None
    return text if text != site.image else None


def pin_text(image: str, digest: Digest) -> str:
    """``nginx:1.25`` -> ``nginx:1.25@sha256:…``; a bare name keeps its implied ``latest``
    visible (``nginx`` -> ``nginx:latest@sha256:…``) so humans still see the tag."""
    has_tag = ":" in image[image.rfind("/") + 1 :]
    return f"{image}{'' if has_tag else ':latest'}@{digest}"
