"""Policy rules: what a ``spec.rules`` key checks about one image.

A rule is built once from its YAML value (``RULES[key](value, path)``) and then asked about
each image a policy matches. Rules are async and get an ``ImageFacts`` so that rules needing
facts about the image itself (its digest today; its signatures or config later) can await
them; facts are fetched at most once per image and review, and only if a rule asks.

To add a rule kind: write a class with ``name`` and ``async check(image)`` returning
violation phrases (read as "policy NAME <phrase>"), and a factory in ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from proxy.errors import NameInvalid, PullgateError
from proxy.oci.digest import Digest
from proxy.oci.globs import GlobSet
from proxy.oci.mediatypes import ParsedManifest
from proxy.oci.reference import ImageReference, normalize_registry_pattern
from proxy.policy import fields
from proxy.trust.service import VerificationCache
from proxy.trust.trustroot import RootHolder
from proxy.trust.verification import SignaturePolicy, VerificationResult


class ResolutionFailed(PullgateError):
    """A tag could not be resolved to a digest; ``reason`` says why in a few words."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


DEFAULT_PLATFORM = "linux/amd64"


@dataclass(frozen=True, slots=True)
class ManifestDoc:
    digest: Digest
    media_type: str
    data: bytes
    parsed: ParsedManifest


class ImageFacts(Protocol):
    """Facts about the image a reference names, fetched lazily (and at most once per review)
    through the mirror's cache. Every method raises ``ResolutionFailed`` with the reason
    when the fact cannot be had (tag not found, upstream unreachable, no cache offline)."""

    async def digest(self) -> Digest:
        """The manifest digest (the reference's own, or its tag resolved)."""
        ...

    async def manifest(self, digest: Digest | None = None) -> ManifestDoc:
        """The manifest the reference names (an index for multi-arch images), or the
        manifest ``digest`` of the same repository."""
        ...

    async def image_manifest(self, platform: str = DEFAULT_PLATFORM) -> ManifestDoc:
        """The single-platform manifest that runs on ``platform``."""
        ...

    async def blob(self, digest: Digest) -> bytes:
        """A small blob of the image's repository (config, signature payload)."""
        ...

    async def config(self, platform: str = DEFAULT_PLATFORM) -> dict[str, Any]:
        """The image config JSON of the ``platform`` image."""
        ...

    async def signatures(self, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        """cosign verification (signatures or attestations) of the image's digest against
        ``policy``, through the one verification service."""
        ...


@dataclass(frozen=True, slots=True)
class ImageContext:
    """One image as a rule sees it."""

    where: str  # 'container "web"', 'volume "data"'
    image: str  # as written in the object
    ref: ImageReference  # normalised; carries the digest the mutation pins, if any
    namespace: str
    facts: ImageFacts
    pinned: bool  # the image will run by digest (given, or pinned by resolveTags)
    resolution_error: str | None = None  # why resolveTags could not pin it
    # The container's effective securityContext (its own over the pod's); None when unset.
    run_as_user: int | None = None
    run_as_non_root: bool | None = None
    runs: bool = True  # False for image volumes: their content is mounted, never executed


class Rule(Protocol):
    @property
    def name(self) -> str:
        """The ``spec.rules`` key, named in every violation."""
        ...

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        """Violations as phrases after "policy NAME", e.g. ``requires a digest``."""
        ...


# (YAML value, field path for errors, directory of the policy file for relative paths)
@dataclass(frozen=True, slots=True)
class Origin:
    """Where a policy comes from, for its rules: ``base`` is where relative file names (key
    files, trusted roots) are looked up; ``roots`` holds the default Sigstore trusted root
    (the shipped one, or a TUF refresh's) for keyless rules that name none."""

    base: Path
    roots: RootHolder


RuleFactory = Callable[[object, str, Origin], Rule | None]


@dataclass(frozen=True, slots=True)
class RequireDigest:
    name = "requireDigest"

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        if image.pinned:
            return ()
        if image.resolution_error:
            return (f"requires a digest (tag resolution failed: {image.resolution_error})",)
        return ("requires a digest",)


@dataclass(frozen=True, slots=True)
class ResolveTagsFailure:
    """With ``resolveTags`` but not ``requireDigest``: report a tag that could not be pinned."""

    name = "resolveTags"

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        if image.resolution_error is None:
            return ()
        return (f"could not pin the tag to a digest: {image.resolution_error}",)


@dataclass(frozen=True, slots=True)
class AllowedRegistries:
    name = "allowedRegistries"
    registries: GlobSet

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        if self.registries.match(image.ref.registry):
            return ()
        allowed = ", ".join(self.registries.patterns)
        return (f"does not allow registry {image.ref.registry} (allowed: {allowed})",)


@dataclass(frozen=True, slots=True)
class DenyTags:
    name = "denyTags"
    tags: GlobSet

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        if image.ref.tag is None or not self.tags.match(image.ref.tag):
            return ()
        return (f"denies tag {image.ref.tag}",)


def _require_digest(value: object, path: str, origin: Origin) -> Rule | None:
    return RequireDigest() if fields.boolean(value, path) else None


def _allowed_registries(value: object, path: str, origin: Origin) -> Rule | None:
    """Registry hosts or host globs, normalized like references' hosts (``INDEX.DOCKER.IO``,
    ``ghcr.io:443`` -> ``docker.io``, ``ghcr.io``)."""
    hosts = fields.string_list(value, path)
    normalized = []
    for i, host in enumerate(hosts):
        if "/" in host or "@" in host:
            raise fields.FieldError(f"{path}[{i}]", f"expected a registry host, got {host!r}")
        try:
            normalized.append(normalize_registry_pattern(host))
        except NameInvalid as exc:
            raise fields.FieldError(f"{path}[{i}]", exc.message) from exc
    return AllowedRegistries(GlobSet.compile(normalized))


def _deny_tags(value: object, path: str, origin: Origin) -> Rule | None:
    tags = fields.string_list(value, path)
    for i, tag in enumerate(tags):
        if "/" in tag or "@" in tag or ":" in tag:
            raise fields.FieldError(f"{path}[{i}]", f"expected a tag (or tag glob), got {tag!r}")
    return DenyTags(GlobSet.compile(tags)) if tags else None


# Built-in rule kinds by their ``spec.rules`` key (``proxy.policy.rules.kinds`` adds the rest).
# ``resolveTags`` and ``rewriteRegistry`` are mutation directives, read by ``proxy.policy.document``.
BUILTIN_RULES: Mapping[str, RuleFactory] = MappingProxyType(
    {
        "requireDigest": _require_digest,
        "allowedRegistries": _allowed_registries,
        "denyTags": _deny_tags,
    }
)
