"""Image references and the one rule for naming an image: registry host, repository, tag.

Every place that turns text into an image name — mirror routing (``ns``, path prefixes),
access rules (on the route), policy matching (``spec.match.images``), base-image and
registry rules, the upstream client and the admission webhook — goes through this module,
so no spelling of a reference can change a decision. The rule, after Docker's
``ParseNormalizedNamed`` (distribution/reference ``normalize.go``):

- The first ``/`` component is a **registry host** when it has a ``.`` or ``:``, is
  ``localhost``, or has uppercase letters (Docker's ``splitDockerDomain``); otherwise the
  image is on Docker Hub and the whole text is the repository.
- A host is compared case-insensitively (RFC 4343) and written lowercase; an IPv6 literal in
  its compressed form; a port in decimal without leading zeros, and a default port (``:443``
  for https, ``:80`` for http: a bare host means either, Docker and containerd try both for
  insecure registries) is dropped — unless the host would then no longer look like a host
  (``foo:443`` stays, ``foo`` alone names a Docker Hub namespace). A host that fails the
  grammar, or an uppercase first component that is no host once lowercased (``Foo/bar``),
  is invalid: refused, never guessed at.
- Docker Hub has several names (``DOCKER_HUB_HOSTS``); all become ``docker.io``, where a
  one-component repository is an official image under ``library/`` (``nginx`` ->
  ``docker.io/library/nginx``).
- Repository names follow the distribution spec grammar
  (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests):
  lowercase, ``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*`` components joined by ``/``; tags
  ``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``. Uppercase in a repository is invalid, not folded.

Patterns (``normalize_pattern``) are written like references with ``*`` (within one ``/``
segment) and ``**`` (across segments) and are normalized by the same rule, so a pattern
and the references it is meant to catch always meet; a pattern that can never match any
normalized name is an error that says why (see ``normalize_pattern`` for the glob rule).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from proxy.errors import NameInvalid, TagInvalid
from proxy.oci.digest import Digest

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST_RE = re.compile(rf"^(?:(?P<name>{_LABEL}(?:\.{_LABEL})*)|\[(?P<ip6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]+))?\Z")
MAX_NAME_LENGTH = 255
MAX_HOST_LENGTH = 300  # 253 for a DNS name, plus brackets and a port
MAX_REFERENCE_LENGTH = 4096

DOCKER_HUB = "docker.io"
# Every name Docker Hub's registry answers to: the name references use, the legacy index
# name (distribution/reference ``legacyDefaultDomain``), the API host, and the old v1 API
# host that serves the v2 API too.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
OFFICIAL_NAMESPACE = "library"
DEFAULT_PORTS = frozenset({443, 80})

# What can appear in a repository pattern (besides the globs): a repository name is made of
# these and nothing else, so any other character means the pattern can never match.
_PATTERN_PATH_CHARS = re.compile(r"^[a-z0-9._/*-]*\Z")
_HOST_GLOB_CHARS = re.compile(r"^[a-z0-9.*:\[\]-]+\Z")
_TAG_GLOB_RE = re.compile(r"^[a-zA-Z0-9_.*-]{1,128}\Z")
_DIGEST_GLOB_RE = re.compile(r"^(?:\*+|[a-z0-9*]+(?:[+._-][a-z0-9*]+)*:[a-zA-Z0-9=_*-]+)\Z")


def validate_repository(name: str) -> str:
    """``name`` when it is a repository name of the distribution spec, else ``NameInvalid``."""
    if len(name) <= MAX_NAME_LENGTH and _REPOSITORY_RE.match(name):
        return name
    shown = name[:300]
    if len(name) <= MAX_NAME_LENGTH and name != name.lower() and _REPOSITORY_RE.match(name.lower()):
        raise NameInvalid(f"invalid repository name {shown!r}: repository names are lowercase ({name.lower()!r})")
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"invalid repository name {shown!r}: longer than {MAX_NAME_LENGTH} characters")
    raise NameInvalid(
        f"invalid repository name {shown!r}: components of lowercase letters and digits, "
        "joined by '.', '_', '__' or '-', separated by '/'"
    )


def validate_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}")
    return tag


def looks_like_host(component: str) -> bool:
    """Docker's rule for a first path component: a registry host when it has a '.' or ':',
    is ``localhost``, or has uppercase letters (distribution/reference ``splitDockerDomain``)."""
    return "." in component or ":" in component or component == "localhost" or component != component.lower()


def normalize_host(host: str) -> str:
    """The one spelling of a registry host (see the module docstring); ``NameInvalid`` for
    anything that is not a host name or address with an optional port."""
    match = _HOST_RE.match(host.lower()) if host.isascii() and len(host) <= MAX_HOST_LENGTH else None
    if match is None:
        raise NameInvalid(f"invalid registry host {host[:100]!r}")
    name = match["name"]
    if name is None:
        try:
            name = f"[{ipaddress.IPv6Address(match['ip6']).compressed}]"
        except ValueError as exc:
            raise NameInvalid(f"invalid registry host {host[:100]!r}: not an IPv6 address") from exc
    if match["port"] is not None:
        port = int(match["port"])
        if not 0 < port < 65536:
            raise NameInvalid(f"invalid registry host {host[:100]!r}: port out of range")
        if port not in DEFAULT_PORTS or not looks_like_host(name):
            name = f"{name}:{port}"
    return DOCKER_HUB if name in DOCKER_HUB_HOSTS else name


def is_registry_host(component: str) -> bool:
    """Whether a first path component names a registry (and is a valid host)."""
    try:
        return looks_like_host(component) and looks_like_host(normalize_host(component))
    except NameInvalid:
        return False


def normalize_repository(registry: str, path: str) -> str:
    """``path`` validated as a repository of the (normalized) ``registry``, with Docker Hub's
    ``library/`` for official images."""
    if registry == DOCKER_HUB and path and "/" not in path:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    return validate_repository(path)


def split_host(name: str) -> tuple[str | None, str]:
    """``HOST/REST`` -> (normalized host, REST) when the first component names a registry,
    else (None, ``name``); ``NameInvalid`` when it looks like a host but is not a valid one."""
    first, slash, rest = name.partition("/")
    if slash and looks_like_host(first):
        return _registry_component(first, name), rest
    return None, name


def split_name(name: str) -> tuple[str, str]:
    """``[HOST/]REPOSITORY`` -> (normalized host, normalized repository)."""
    host, path = split_host(name)
    registry = DOCKER_HUB if host is None else host
    return registry, normalize_repository(registry, path)


def _registry_component(first: str, whole: str) -> str:
    try:
        registry = normalize_host(first)
    except NameInvalid as exc:
        raise NameInvalid(f"invalid image name {whole[:300]!r}: {exc.message}") from exc
    if not looks_like_host(registry):  # 'Foo/bar': uppercase, but 'foo' names no registry
        raise NameInvalid(
            f"invalid image name {whole[:300]!r}: {first[:100]!r} is not a registry host (a host has a '.' "
            "or ':' or is localhost) and repository names are lowercase"
        )
    return registry


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A fully normalized image reference: registry, repository, optional tag and digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse and normalize ``text``; a reference with neither tag nor digest gets ``latest``."""
        if not text or len(text) > MAX_REFERENCE_LENGTH or text != text.strip():
            raise NameInvalid(f"invalid image reference {text[:300]!r}")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest_text = rest.partition("@")
            digest = Digest.parse(digest_text)
        tag = None
        if ":" in rest[rest.rfind("/") + 1 :]:
            rest, _, tag = rest.rpartition(":")
            validate_tag(tag)
        registry, repository = split_name(rest)
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

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


# --- patterns -----------------------------------------------------------------------------------
def normalize_pattern(pattern: str) -> str:
    """An image-name glob as written in a policy -> the glob over normalized names.

    The glob rule, decided once: a pattern reads like a reference (no tag), where ``*``
    matches within a ``/`` segment and ``**`` across segments (``proxy.oci.globs``).

    - A first component with a glob that is followed by ``/``, or that holds ``**``, is a
      glob over registries and is kept (lowercased): ``*/acme/app``, ``**``, ``*.gcr.io/**``.
    - Otherwise the first component is a registry host by the reference rule, normalized
      like a reference's (``GHCR.IO:443/acme/**`` -> ``ghcr.io/acme/**``); else the pattern
      is a Docker Hub repository (``acme/*`` -> ``docker.io/acme/*``).
    - On Docker Hub a single-segment repository glob without ``**`` names official images:
      ``nginx``, ``ngin*``, ``docker.io/ngin*`` all become ``docker.io/library/ngin*``
      (repositories there always have two segments, so as written they could match nothing).
    - The repository part must be able to match a repository name: lowercase, and only
      name characters besides ``*`` (``NGINX``, ``docker.io/library/[abc`` are errors).
    """
    if not pattern or pattern != pattern.strip() or len(pattern) > MAX_REFERENCE_LENGTH:
        raise NameInvalid(f"{pattern[:100]!r} is not an image pattern (empty or surrounded by spaces)")
    first, slash, rest = pattern.partition("/")
    if "*" in first and (slash or "**" in first):
        if not _HOST_GLOB_CHARS.match(first.lower()):
            raise NameInvalid(f"{pattern[:100]!r}: {first[:100]!r} can never match a registry host")
        if not slash:
            return first
        registry = first.lower()
        return f"{registry}/{_path_glob(rest, pattern)}"
    if slash and looks_like_host(first) and "*" not in first:
        registry, path = _registry_component(first, pattern), rest
    else:
        registry, path = DOCKER_HUB, pattern
    if registry == DOCKER_HUB and "/" not in path and "**" not in path:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    return f"{registry}/{_path_glob(path, pattern)}"


def normalize_registry_pattern(pattern: str) -> str:
    """A registry host or host glob (``allowedRegistries``) -> its normalized form."""
    if "*" in pattern:
        if not _HOST_GLOB_CHARS.match(pattern.lower()):
            raise NameInvalid(f"{pattern[:100]!r} can never match a registry host")
        return pattern.lower()
    host = normalize_host(pattern)
    if not looks_like_host(host):
        raise NameInvalid(
            f"{pattern[:100]!r} is not a registry host (a host has a '.' or ':' or is localhost; "
            "Docker Hub is docker.io)"
        )
    return host


def normalize_reference_pattern(pattern: str) -> str:
    """A reference glob with an optional ``:TAG`` or ``@DIGEST`` glob (``allowedBaseImages``:
    ``python:3.*``, ``gcr.io/distroless/**``): the name part by ``normalize_pattern``."""
    if not pattern or pattern != pattern.strip() or " " in pattern:
        raise NameInvalid(f"{pattern[:100]!r} is not an image pattern (empty or with spaces)")
    last = pattern.rfind("/") + 1
    cut = min((i for i in (pattern.find(":", last), pattern.find("@", last)) if i >= 0), default=len(pattern))
    name, suffix = pattern[:cut], pattern[cut:]
    if suffix.startswith(":") and "@" in suffix:
        tag, _, digest = suffix[1:].partition("@")
        ok = bool(_TAG_GLOB_RE.match(tag)) and bool(_DIGEST_GLOB_RE.match(digest))
    elif suffix.startswith(":"):
        ok = bool(_TAG_GLOB_RE.match(suffix[1:]))
    else:
        ok = not suffix or bool(_DIGEST_GLOB_RE.match(suffix[1:]))
    if not ok:
        raise NameInvalid(f"{pattern[:100]!r}: {suffix[:100]!r} can never match a tag or digest")
    return normalize_pattern(name) + suffix


def _path_glob(path: str, pattern: str) -> str:
    """``path`` when some repository name can match it (the check tries each ``*`` as
    one character and as nothing)."""
    if not path:
        raise NameInvalid(f"{pattern[:100]!r} names no repository")
    if not _PATTERN_PATH_CHARS.match(path):
        if _PATTERN_PATH_CHARS.match(path.lower()):
            raise NameInvalid(f"{pattern[:100]!r} can never match: repository names are lowercase")
        bad = next(c for c in path if not _PATTERN_PATH_CHARS.match(c))
        raise NameInvalid(
            f"{pattern[:100]!r} can never match: {bad!r} is not in any repository name "
            "(patterns use * and ** as globs; every other character is literal)"
        )
    if not any(_REPOSITORY_RE.match(path.replace("*", fill)) for fill in ("x", "")):
        raise NameInvalid(
            f"{pattern[:100]!r} can never match a repository name (components of lowercase letters and digits, "
            "joined by '.', '_', '__' or '-', separated by '/')"
        )
    return path
