"""Which upstream and repository a mirror request is for.

In order: the ``ns`` query parameter that containerd adds to mirror requests (the
distribution spec's proxying section), a path prefix naming a configured upstream
(``/v2/ghcr.io/owner/app/...`` for podman/CRI-O ``registries.conf`` mirrors that cannot send
``ns``), else ``default_upstream``. Only configured upstreams are ever routed to.

Hosts are compared in their one spelling (``proxy.oci.reference.normalize_host``: case,
default ports, Docker Hub's aliases), so ``ns=GHCR.IO``, ``ns=ghcr.io:443`` and a
``/v2/GhCr.Io/...`` prefix all reach the ``ghcr.io`` upstream, and access rules and
pull-time policies see the same (upstream, repository) whatever the spelling. A first path
component that names a registry (Docker's rule: it has a ``.`` or ``:`` or is ``localhost``)
which is not configured is refused — ``registry quay.io is not mirrored here`` — rather than
taken as part of a repository name on the default upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config.settings import Config, UpstreamConfig
from proxy.errors import NameInvalid, NameUnknown
from proxy.oci.reference import (
    DOCKER_HUB,
    ImageReference,
    looks_like_host,
    normalize_host,
    normalize_repository,
    split_host,
)

_ROUTES_REMEMBERED = 4096  # (name, ns) pairs; a warm mirror serves far fewer repositories


@dataclass(frozen=True, slots=True)
class Route:
    upstream: str  # configured upstream name
    repository: str  # repository name on that upstream
    namespace: str | None = None  # the ``ns`` the client sent, echoed as OCI-Namespace


def registry_name(upstream: UpstreamConfig) -> str:
    """How image references name an upstream: its name when that is a registry host
    (``docker.io``, ``ghcr.io``), else its URL's host — in the normalized spelling, so
    ``ImageReference.parse`` of a reference to it routes back here and policies match it."""
    for candidate in (upstream.name, upstream.host):
        if looks_like_host(candidate):
            try:
                host = normalize_host(candidate)
            except NameInvalid:
                continue
            if looks_like_host(host):
                return host
    return upstream.host


class Router:
    def __init__(self, config: Config) -> None:
        self._by_name = {u.name: u for u in config.upstreams}
        self._registries = {u.name: registry_name(u) for u in config.upstreams}
        # Every normalized host an upstream answers to (its name when that is a host, its
        # URL's host); on a shared host the upstream listed first wins.
        self._by_host: dict[str, UpstreamConfig] = {}
        self._docker_hub: set[str] = set()  # upstreams that are Docker Hub, under any name
        for upstream in config.upstreams:
            hosts = (self._registries[upstream.name], _url_host(upstream))
            for host in hosts:
                if host is not None:
                    self._by_host.setdefault(host, upstream)
            if DOCKER_HUB in hosts:
                self._docker_hub.add(upstream.name)
        self._default = config.default_upstream
        # Routing is a pure function of the (immutable) config: the answers for names seen
        # recently are remembered (every request is routed; parsing costs a few µs). Bounded
        # by emptying when full; refusals are not remembered.
        self._routes: dict[tuple[str, str | None], Route] = {}

    def route(self, name: str, ns: str | None) -> Route:
        found = self._routes.get((name, ns))
        if found is None:
            found = self._route(name, ns)
            if len(self._routes) >= _ROUTES_REMEMBERED:
                self._routes.clear()
            self._routes[(name, ns)] = found
        return found

    def _route(self, name: str, ns: str | None) -> Route:
        if ns is not None:
            upstream = self._named(ns)
            return Route(upstream.name, self._repository(upstream, name), ns)
        host, rest = split_host(name)
        if host is not None:
            found = self._by_host.get(host)
            if found is None:
                raise NameUnknown(f"registry {host} is not mirrored here")
            return Route(found.name, self._repository(found, rest))
        first, _, rest = name.partition("/")
        if rest and first in self._by_name:  # an upstream's own name as prefix ("private/team/app")
            return Route(first, self._repository(self._by_name[first], rest))
        if self._default is None:
            raise NameUnknown("no upstream named in the path and no default_upstream configured")
        return Route(self._default, self._repository(self._by_name[self._default], name))

    def route_image(self, ref: ImageReference) -> Route:
        """Where the mirror caches (and fetches) the image ``ref`` names."""
        return self.route(ref.repository, ref.registry)

    def registry(self, upstream: str) -> str:
        """The registry host references use for the configured upstream ``upstream``."""
        return self._registries[upstream]

    def _named(self, ns: str) -> UpstreamConfig:
        """The upstream an ``ns`` value names: a configured name as written, or a host."""
        found = self._by_name.get(ns)
        if found is not None:
            return found
        if not looks_like_host(ns):
            raise NameUnknown(f"registry {ns[:100]!r} is not mirrored here")
        host = normalize_host(ns)
        found = self._by_host.get(host)
        if found is None:
            raise NameUnknown(f"registry {host} is not mirrored here")
        return found

    def _repository(self, upstream: UpstreamConfig, name: str) -> str:
        if not name:
            raise NameInvalid("empty repository name")
        # Docker Hub keeps official images under library/ ("alpine" -> "library/alpine").
        return normalize_repository(DOCKER_HUB if upstream.name in self._docker_hub else "", name)


def _url_host(upstream: UpstreamConfig) -> str | None:
    try:
        return normalize_host(upstream.host)
    except NameInvalid:  # e.g. an underscore: reachable by its name only
        return None
