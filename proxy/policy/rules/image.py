"""The ``image`` policy rule block: what is inside the image the pod will run.

```yaml
image:
  platform: linux/amd64          # the platform image judged (default linux/amd64)
  denyRootUser: true
  denySecretsInEnv: true
  denySecretsInHistory: true
  maxCompressedSize: 500MiB
  maxLayers: 50
  requirePlatforms: [linux/amd64, linux/arm64]
  maxAge: 90d
  requireLabels: [org.opencontainers.image.source]
  allowedBaseImages: ["docker.io/library/python:*", "gcr.io/distroless/**"]
```

Everything is judged on the resolved digest, from the manifest and the image config
(``config.md`` of the OCI image spec) fetched through the mirror's cache — no layer is
downloaded: sizes and layer counts come from the manifest's descriptors. Semantics, and
what the pod's ``securityContext`` changes, are documented in ``policies/image-hygiene.yaml``.
A fact that cannot be had (tag unknown, upstream down, no cache) is a violation that says
why, never a silent pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cachetools import LRUCache

from proxy.config.units import format_size
from proxy.errors import NameInvalid, PullgateError
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.globs import GlobSet
from proxy.oci.reference import ImageReference, normalize_reference_pattern
from proxy.policy import fields
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import (
    DEFAULT_PLATFORM,
    ImageContext,
    ImageFacts,
    ManifestDoc,
    Origin,
    ResolutionFailed,
)
from proxy.policy.rules.secretscan import Finding, scan_env, scan_text

NAME = "image"
BASE_NAME = "org.opencontainers.image.base.name"  # image-spec annotations.md
FIELDS = (
    "platform",
    "denyRootUser",
    "denySecretsInEnv",
    "denySecretsInHistory",
    "maxCompressedSize",
    "maxLayers",
    "requirePlatforms",
    "maxAge",
    "requireLabels",
    "allowedBaseImages",
)
_PLATFORM_RE = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?\Z")
_ROOT_USERS = frozenset({"", "root", "0"})
_ATTESTATION = "unknown/unknown"
# Reproducible builds (distroless, ko, nix) stamp the epoch or Go's zero time: no build date.
_NO_DATE_BEFORE = 86400.0


class ScanCache:
    """A bounded map of config digest -> secret-scan phrases (least recently used out
    first; a config's content never changes, so entries need no expiry)."""

    def __init__(self, size: int = 4096) -> None:
        self._entries: LRUCache[Digest, tuple[str, ...]] = LRUCache(size)

    def get(self, digest: Digest) -> tuple[str, ...] | None:
        return self._entries.get(digest)

    def put(self, digest: Digest, phrases: tuple[str, ...]) -> tuple[str, ...]:
        self._entries[digest] = phrases
        return phrases


@dataclass(frozen=True)
class ImageRules:
    name = NAME
    platform: str = DEFAULT_PLATFORM
    deny_root_user: bool = False
    deny_secrets_in_env: bool = False
    deny_secrets_in_history: bool = False
    max_compressed_size: int | None = None
    max_layers: int | None = None
    require_platforms: tuple[str, ...] = ()
    max_age: tuple[float, str] | None = None  # seconds, as written
    require_labels: tuple[str, ...] = ()
    allowed_base_images: GlobSet | None = None
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)
    # Secret-scan phrases by config digest: content-addressed, so never stale; it keeps a
    # warm review to a dict lookup instead of a regex pass over every env and history line.
    scans: ScanCache = field(default_factory=ScanCache, compare=False, repr=False)

    @property
    def needs_config(self) -> bool:
        return (
            self.deny_root_user
            or self.deny_secrets_in_env
            or self.deny_secrets_in_history
            or self.max_age is not None
            or bool(self.require_labels)
            or self.allowed_base_images is not None
        )

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        try:
            top = await image.facts.manifest()
            platform_image = await image.facts.image_manifest(self.platform)
        except ResolutionFailed as exc:
            return (*await self._index_platforms(image.facts), f"image manifest unavailable: {exc.reason}")
        try:
            config = await image.facts.config(self.platform) if self._wants_config(top) else {}
        except ResolutionFailed as exc:
            return (f"image config unavailable: {exc.reason}",)
        phrases = self._platforms(_offered(top, config)) if self.require_platforms else []
        phrases += self._layers(top, platform_image)
        phrases += self._config_rules(image, config, platform_image.parsed.children[0].digest)
        if self.allowed_base_images is not None:
            phrases += self._base_image(_base_name(top, platform_image, config))
        return tuple(phrases)

    def _wants_config(self, top: ManifestDoc) -> bool:
        return self.needs_config or (bool(self.require_platforms) and not top.parsed.is_index)

    async def _index_platforms(self, facts: ImageFacts) -> list[str]:
        """requirePlatforms still judged when the index lacks the platform to inspect."""
        if not self.require_platforms:
            return []
        try:
            top = await facts.manifest()
        except ResolutionFailed:
            return []
        return self._platforms(_offered(top, {})) if top.parsed.is_index else []

    def _config_rules(self, image: ImageContext, config: Mapping[str, Any], digest: Digest) -> list[str]:
        run = _mapping(config.get("config"))
        phrases = []
        if self.deny_root_user and image.runs:
            phrases += _root_user(image, str(run.get("User") or ""))
        if self.deny_secrets_in_env or self.deny_secrets_in_history:
            phrases += self._secrets(config, digest)
        if self.max_age is not None:
            phrases += self._age(config.get("created"))
        if self.require_labels:
            labels = _mapping(run.get("Labels"))
            if missing := [name for name in self.require_labels if not labels.get(name)]:
                phrases.append(f"image.requireLabels: missing label {', '.join(missing)}")
        return phrases

    def _secrets(self, config: Mapping[str, Any], digest: Digest) -> tuple[str, ...]:
        cached = self.scans.get(digest)
        if cached is not None:
            return cached
        phrases: list[str] = []
        if self.deny_secrets_in_env:
            env = [e for e in _list(_mapping(config.get("config")).get("Env")) if isinstance(e, str)]
            if findings := scan_env(env):
                phrases.append(f"image.denySecretsInEnv: secret-looking env {_describe(findings)}")
        if self.deny_secrets_in_history:
            phrases += _history_secrets(_list(config.get("history")))
        return self.scans.put(digest, tuple(phrases))

    def _platforms(self, offered: tuple[str, ...]) -> list[str]:
        missing = [p for p in self.require_platforms if not any(_platform_matches(p, o) for o in offered)]
        if not missing:
            return []
        return [f"image.requirePlatforms: missing {', '.join(missing)} (offers {', '.join(offered) or 'none'})"]

    def _layers(self, top: ManifestDoc, image: ManifestDoc) -> list[str]:
        layers = image.parsed.children[1:]
        which = f"{self.platform} image" if top.parsed.is_index else "image"
        phrases = []
        size = sum(layer.size for layer in layers)
        if self.max_compressed_size is not None and size > self.max_compressed_size:
            limit = format_size(self.max_compressed_size)
            phrases.append(f"image.maxCompressedSize: {which} is {format_size(size)} compressed (max {limit})")
        if self.max_layers is not None and len(layers) > self.max_layers:
            phrases.append(f"image.maxLayers: {which} has {len(layers)} layers (max {self.max_layers})")
        return phrases

    def _age(self, created: object) -> list[str]:
        assert self.max_age is not None
        limit, text = self.max_age
        when = _timestamp(created)
        if when is None or when < _NO_DATE_BEFORE:
            return [f"image.maxAge: build date unknown (config.created {str(created)[:40]!r})"]
        age = self.clock() - when
        if age <= limit:
            return []
        return [f"image.maxAge: built {str(created)[:10]}, {age / 86400:.0f} days ago (max {text})"]

    def _base_image(self, base: str | None) -> list[str]:
        assert self.allowed_base_images is not None
        if base is None:
            return [f"image.allowedBaseImages: base image unknown (no {BASE_NAME} annotation or label)"]
        try:
            ref = ImageReference.parse(base)
        except PullgateError:
            return [f"image.allowedBaseImages: base image {base[:200]!r} is not an image reference"]
        candidates = [ref.name]  # a pattern without a tag allows every tag
        candidates += [f"{ref.name}:{ref.tag}"] if ref.tag else []
        candidates += [f"{ref.name}@{ref.digest}"] if ref.digest else []
        if any(self.allowed_base_images.match(c) for c in candidates):
            return []
        allowed = ", ".join(self.allowed_base_images.patterns)
        shown = f"{ref.name}:{ref.tag}" if ref.tag else str(ref)
        return [f"image.allowedBaseImages: base image {shown} is not allowed (allowed: {allowed})"]


def is_root(user: str) -> bool:
    """Whether an image config ``User`` (``user``, ``uid``, ``user:group``) runs as root;
    unset means root (config.md: "defaults to root")."""
    return user.strip().partition(":")[0] in _ROOT_USERS


def _root_user(image: ImageContext, user: str) -> list[str]:
    # runAsUser replaces the image's user; runAsNonRoot makes the kubelet refuse to start a
    # root image (https://kubernetes.io/docs/tasks/configure-pod-container/security-context/).
    if image.run_as_user is not None:
        if image.run_as_user == 0:
            return ["image.denyRootUser: runs as root (securityContext.runAsUser: 0)"]
        return []
    if image.run_as_non_root or not is_root(user):
        return []
    shown = f'image user "{user}"' if user else "image sets no user"
    return [f"image.denyRootUser: runs as root ({shown})"]


def _history_secrets(history: list[Any]) -> list[str]:
    found = []
    for i, step in enumerate(history):
        line = step.get("created_by") if isinstance(step, dict) else None
        if isinstance(line, str) and (findings := scan_text(line)):
            found.append(f"history[{i}] {_describe(findings)}")
    return [f"image.denySecretsInHistory: secret-looking {', '.join(found)}"] if found else []


def _describe(findings: list[Finding]) -> str:
    return ", ".join(f.describe() for f in findings)


def _offered(top: ManifestDoc, config: Mapping[str, Any]) -> tuple[str, ...]:
    if top.parsed.is_index:
        # buildx lists its attestation manifests as platform unknown/unknown: not an image
        return tuple(dict.fromkeys(d.platform for d in top.parsed.children if d.platform not in (None, _ATTESTATION)))
    parts = (config.get("os"), config.get("architecture"), config.get("variant"))
    text = "/".join(str(p) for p in parts if p)
    return (text,) if text else ()


def _platform_matches(required: str, offered: str) -> bool:
    """``linux/arm64`` is offered by ``linux/arm64/v8``; ``linux/arm/v7`` only by itself."""
    return offered == required or (required.count("/") == 1 and offered.startswith(required + "/"))


def _base_name(top: ManifestDoc, image: ManifestDoc, config: Mapping[str, Any]) -> str | None:
    for doc in (image, top):
        value = _mapping(_json(doc.data).get("annotations")).get(BASE_NAME)
        if isinstance(value, str) and value:
            return value
    label = _mapping(_mapping(config.get("config")).get("Labels")).get(BASE_NAME)
    return label if isinstance(label, str) and label else None


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:  # RFC 3339; Go writes nanoseconds, which fromisoformat (3.11) cuts to micro
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value)).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _json(data: bytes) -> Mapping[str, Any]:
    """A manifest's object for its annotations; the manifest parsed already, so this cannot
    fail in practice — but an unreadable one has no annotations rather than an error."""
    try:
        return jsondoc.parse_object(data, "manifest")
    except jsondoc.JsonInvalid:
        return {}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


# --- parsing --------------------------------------------------------------------------------
def build(value: object, path: str, origin: Origin) -> ImageRules | None:
    doc = fields.mapping(value, path, FIELDS)
    rules = ImageRules(
        platform=_platform(doc.get("platform", DEFAULT_PLATFORM), f"{path}.platform"),
        deny_root_user=fields.boolean(doc.get("denyRootUser", False), f"{path}.denyRootUser"),
        deny_secrets_in_env=fields.boolean(doc.get("denySecretsInEnv", False), f"{path}.denySecretsInEnv"),
        deny_secrets_in_history=fields.boolean(doc.get("denySecretsInHistory", False), f"{path}.denySecretsInHistory"),
        max_compressed_size=_optional(doc, "maxCompressedSize", path, fields.size),
        max_layers=_optional(doc, "maxLayers", path, _count),
        require_platforms=tuple(
            _platform(p, f"{path}.requirePlatforms[{i}]")
            for i, p in enumerate(fields.string_list(doc.get("requirePlatforms", []), f"{path}.requirePlatforms"))
        ),
        max_age=_optional(doc, "maxAge", path, _age),
        require_labels=fields.string_list(doc.get("requireLabels", []), f"{path}.requireLabels"),
        allowed_base_images=_optional(doc, "allowedBaseImages", path, _base_globs),
    )
    return None if rules == ImageRules(platform=rules.platform) else rules


def _optional(doc: Mapping[str, Any], key: str, path: str, parse: Callable[[object, str], Any]) -> Any:
    return None if doc.get(key) is None else parse(doc[key], f"{path}.{key}")


def _platform(value: object, path: str) -> str:
    text = fields.string(value, path)
    if not _PLATFORM_RE.match(text):
        raise FieldError(path, f"expected os/arch[/variant] like linux/arm64, got {text!r}")
    return text


def _count(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FieldError(path, f"expected a whole number ≥ 1, got {fields.kind_of(value)}")
    return value


def _age(value: object, path: str) -> tuple[float, str]:
    return fields.duration(value, path), str(value)


def _base_globs(value: object, path: str) -> GlobSet:
    patterns = fields.string_list(value, path)
    if not patterns:
        raise FieldError(path, "must name at least one base image pattern (omit the field to allow any)")
    return GlobSet.compile(_base_pattern(p, f"{path}[{i}]") for i, p in enumerate(patterns))


def _base_pattern(pattern: str, path: str) -> str:
    """A reference glob normalized by the reference rule (``python:*`` ->
    ``docker.io/library/python:*``); the tag or digest part is kept as written."""
    try:
        return normalize_reference_pattern(pattern)
    except NameInvalid as exc:
        raise FieldError(path, f"expected an image pattern like docker.io/library/python:*: {exc.message}") from exc
