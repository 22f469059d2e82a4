"""Image content through the mirror's cache, for the policy engine: manifests, small blobs
(configs, signature payloads) and referrers of one upstream. Everything read here is
fetched, verified and cached exactly as a node's pull would be — so a node pulling through
the mirror makes an image's signatures available offline too, and the webhook's checks are
memory or disk reads most of the time.

``MirrorContent`` is the ``SignatureSource`` of ``proxy.trust.verification`` for one upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from proxy.errors import BlobUnknown, ManifestInvalid, ManifestUnknown, UpstreamError, UpstreamUnavailable
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.registry.blobs import BlobService, CachedBlob
from proxy.registry.manifests import ManifestCache
from proxy.registry.routing import Route
from proxy.registry.store import BlobStore

# The mirror's referrers lookup: (body, filtered, supported) for a route, digest and type.
ReferrersLookup = Callable[[Route, Digest, str | None], Awaitable[tuple[bytes, bool, bool]]]

MAX_CONTENT = 4 << 20  # configs and signature payloads are small; refuse anything larger


class MirrorContent:
    """Built by ``Mirror.content`` from the mirror's parts, so this module needs no
    ``Mirror`` (which builds it) and the two never import each other."""

    def __init__(
        self,
        manifests: ManifestCache,
        blobs: BlobService,
        store: BlobStore,
        referrers: ReferrersLookup,
        upstream: str,
    ) -> None:
        self._manifests = manifests
        self._blobs = blobs
        self._store = store
        self._referrers = referrers
        self._upstream = upstream

    def _route(self, repository: str) -> Route:
        return Route(self._upstream, repository)

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        try:
            manifest = await self._manifests.get(self._route(repository), reference, count=False)
        except ManifestUnknown:
            return None
        return manifest.data, manifest.media_type

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None:
        try:
            found = await self._blobs.get(self._route(repository), digest)
        except BlobUnknown:
            return None
        if isinstance(found, CachedBlob):
            if found.size > MAX_CONTENT:
                raise ManifestInvalid(f"blob {digest} is too large to inspect ({found.size} bytes)")
            return await self._store.read(digest)
        if found.size is not None and found.size > MAX_CONTENT:
            raise ManifestInvalid(f"blob {digest} is too large to inspect ({found.size} bytes)")
        data = bytearray()
        async for chunk in found.read():
            data += chunk
            if len(data) > MAX_CONTENT:
                raise ManifestInvalid(f"blob {digest} is too large to inspect")
        return bytes(data)

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        """The referrers index, or None when the upstream has no referrers API (or cannot be
        reached): the caller then falls back to the ``sha256-<hex>`` tag, which the cache
        can answer offline."""
        try:
            body, _, supported = await self._referrers(self._route(repository), digest, artifact_type)
        except UpstreamUnavailable:
            return None
        if not supported:
            return None
        return jsondoc.parse_object(body, "referrers index", error=UpstreamError)
