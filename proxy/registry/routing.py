"""Which upstream and repository a mirror request is for.

In order: the ``ns`` query parameter that containerd adds to mirror requests (the
distribution spec's proxying section), a path prefix naming a configured upstream
(``/v2/ghcr.io/owner/app/...`` for podman/CRI-O ``registries.conf`` mirrors that cannot send
``ns``), else ``default_upstream``. Only configured upstreams are ever routed to.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config.settings import Config, UpstreamConfig
from proxy.errors import NameInvalid, NameUnknown
from proxy.oci.reference import validate_repository

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Route:
    upstream: str  # configured upstream name
    repository: str  # repository name on that upstream
    namespace: str | None = None  # the ``ns`` the client sent, echoed as OCI-Namespace


class Router:
    def __init__(self, config: Config) -> None:
        self._by_name = {u.name: u for u in config.upstreams}
        self._by_host = {u.host: u for u in config.upstreams}
        self._default = config.default_upstream

    def route(self, name: str, ns: str | None) -> Route:
        if ns is not None:
            upstream = self._lookup(ns.lower())
            if upstream is None:
                raise NameUnknown(f"registry {ns[:100]!r} is not mirrored here")
            return Route(upstream.name, self._repository(upstream, name), ns)
        first, _, rest = name.partition("/")
        upstream = self._lookup(first) if rest else None
        if upstream is not None:
            return Route(upstream.name, self._repository(upstream, rest))
        if self._default is None:
            raise NameUnknown("no upstream named in the path and no default_upstream configured")
        return Route(self._default, self._repository(self._by_name[self._default], name))

    def _lookup(self, key: str) -> UpstreamConfig | None:
        if key in DOCKER_HUB_HOSTS:
            hub = next((u for u in self._by_name.values() if is_docker_hub(u)), None)
            if hub is not None:
                return hub
        return self._by_name.get(key) or self._by_host.get(key)

    @staticmethod
    def _repository(upstream: UpstreamConfig, name: str) -> str:
        if not name:
            raise NameInvalid("empty repository name")
        validate_repository(name)
        # Docker Hub keeps official images under library/ ("alpine" -> "library/alpine").
        if is_docker_hub(upstream) and "/" not in name:
            name = f"library/{name}"
        return name


def is_docker_hub(upstream: UpstreamConfig) -> bool:
    return upstream.name in DOCKER_HUB_HOSTS or upstream.host in DOCKER_HUB_HOSTS
