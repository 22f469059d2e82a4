"""Manifest media types, Accept negotiation and the little of a manifest's content the
mirror needs: what it references (for eviction and per-repository blob access) and, for
indexes, which platforms it offers.

Specs: https://github.com/opencontainers/image-spec/blob/main/manifest.md,
https://github.com/opencontainers/image-spec/blob/main/image-index.md and Docker's
https://distribution.github.io/distribution/spec/manifest-v2-2/.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from proxy.errors import DigestInvalid, ManifestInvalid
from proxy.oci import jsondoc
from proxy.oci.digest import Digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES

# What we ask upstreams for: every type we can cache and serve, so one cached copy per tag
# answers every client (we never ask for schema1, which we cannot verify by digest).
UPSTREAM_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: str | None = None  # "os/arch[/variant]" for index entries


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    children: tuple[Descriptor, ...]  # index: manifests; image: config + layers
    subject: Digest | None = None

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def parse_manifest(data: bytes, content_type: str | None) -> ParsedManifest:
    """Parse a manifest strictly enough to know its type and what it references.

    The media type comes from the body's ``mediaType`` when present (OCI makes it
    SHOULD, Docker MUST), else from the response's ``Content-Type``.
    """
    doc = jsondoc.parse(data, "manifest", error=ManifestInvalid)
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ManifestInvalid("not a schemaVersion 2 manifest")
    declared = _media_type(content_type)
    media_type = doc.get("mediaType") or declared
    if media_type is None and isinstance(doc.get("manifests"), list):
        media_type = OCI_INDEX
    elif media_type is None and "layers" in doc:
        media_type = OCI_MANIFEST
    # isinstance first: a JSON object or list as mediaType is unhashable (found by fuzz/).
    if not isinstance(media_type, str) or media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {str(media_type)[:100]!r}")
    try:
        if media_type in INDEX_TYPES:
            children = tuple(_descriptor(d, with_platform=True) for d in doc["manifests"])
        else:
            children = (_descriptor(doc["config"]), *tuple(_descriptor(d) for d in doc["layers"]))
        subject = _descriptor(doc["subject"]).digest if doc.get("subject") else None
    except (KeyError, TypeError, ValueError, DigestInvalid) as exc:
        raise ManifestInvalid(f"malformed {media_type}: {exc}") from exc
    return ParsedManifest(media_type, children, subject)


def _descriptor(raw: Any, *, with_platform: bool = False) -> Descriptor:
    if not isinstance(raw, dict):
        raise TypeError("descriptor is not an object")
    size = raw["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"bad descriptor size {size!r}")
    platform = None
    if with_platform and isinstance(raw.get("platform"), dict):
        p = raw["platform"]
        platform = "/".join(str(x) for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
    return Descriptor(str(raw.get("mediaType", "")), Digest.parse(str(raw["digest"])), size, platform)


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


@lru_cache(maxsize=256)
def parse_accept(header: str | None) -> frozenset[str]:
    """Media types a client accepts; empty means "anything" (no header, or */*). Memoized:
    clients send the same few headers on every request."""
    if not header:
        return frozenset()
    types = {_media_type(part) for part in header.split(",")}
    types.discard(None)
    if "*/*" in types:
        return frozenset()
    return frozenset(t for t in types if t)


def acceptable(media_type: str, accepted: frozenset[str]) -> bool:
    return not accepted or media_type in accepted


def pick_platform(manifest: ParsedManifest, platform: str = "linux/amd64") -> Descriptor | None:
    """The index entry for ``platform`` — what Distribution serves to a client that does not
    accept manifest lists."""
    return next((d for d in manifest.children if d.platform == platform), None)
