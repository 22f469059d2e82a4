"""Repository names, tags and image references.

Repository name and tag grammar from the distribution spec
(https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests):
``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`` and
``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``. Image references are normalised the way Docker
does (``nginx`` -> ``docker.io/library/nginx:latest``), see distribution/reference
``ParseNormalizedNamed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import NameInvalid, TagInvalid
from proxy.oci.digest import Digest

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
MAX_NAME_LENGTH = 255

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def validate_repository(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _REPOSITORY_RE.match(name):
        lowercase = " (repository names are lowercase)" if name != name.lower() else ""
        raise NameInvalid(f"invalid repository name {name[:300]!r}{lowercase}")
    return name


def validate_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}")
    return tag


def is_registry_host(component: str) -> bool:
    """Docker's rule: a first path component is a host if it has a '.' or ':' or is localhost."""
    return ("." in component or ":" in component or component == "localhost") and _HOST_RE.match(component) is not None


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A fully normalised image reference: registry, repository, optional tag and digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse and normalise ``text``; a reference with neither tag nor digest gets ``latest``."""
        if not text or len(text) > 4096 or text != text.strip():
            raise NameInvalid(f"invalid image reference {text[:300]!r}")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest_text = rest.partition("@")
            digest = Digest.parse(digest_text)
        tag = None
        last_slash = rest.rfind("/")
        if ":" in rest[last_slash + 1 :]:
            rest, _, tag = rest.rpartition(":")
            validate_tag(tag)
        registry, _, path = rest.partition("/")
        if not path or not is_registry_host(registry):
            registry, path = DOCKER_HUB, rest
        if registry in _DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in path:
                path = f"library/{path}"
        validate_repository(path)
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: Digest) -> ImageReference:
        return ImageReference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
