"""Image content through the mirror's cache, for the policy engine: manifests, small blobs
(configs, signature payloads) and referrers of one upstream. Everything read here is
fetched, verified and cached exactly as a node's pull would be — so a node pulling through
the mirror makes an image's signatures available offline too, and the webhook's checks are
memory or disk reads most of the time.

``MirrorContent`` is the ``SignatureSource`` of ``proxy.signatures`` for one upstream.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from proxy.blobs import CachedBlob
from proxy.digest import Digest
from proxy.errors import BlobUnknown, ManifestInvalid, ManifestUnknown, UpstreamUnavailable
from proxy.reference import ImageReference
from proxy.routing import Route

if TYPE_CHECKING:
    from proxy.mirror import Mirror

MAX_CONTENT = 4 << 20  # configs and signature payloads are small; refuse anything larger


class MirrorContent:
    def __init__(self, mirror: Mirror, upstream: str) -> None:
        self._mirror = mirror
        self._upstream = upstream

    @classmethod
    def for_image(cls, mirror: Mirror, ref: ImageReference) -> MirrorContent:
        return cls(mirror, mirror.route_image(ref).upstream)

    def _route(self, repository: str) -> Route:
        return Route(self._upstream, repository)

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        try:
            manifest = await self._mirror.manifests.get(self._route(repository), reference, count=False)
        except ManifestUnknown:
            return None
        return manifest.data, manifest.media_type

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None:
        try:
            found = await self._mirror.blobs.get(self._route(repository), digest)
        except BlobUnknown:
            return None
        if isinstance(found, CachedBlob):
            if found.size > MAX_CONTENT:
                raise ManifestInvalid(f"blob {digest} is too large to inspect ({found.size} bytes)")
            return self._mirror.store.read(digest)
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
            body, _, supported = await self._mirror.referrers_index(self._route(repository), digest, artifact_type)
        except UpstreamUnavailable:
            return None
        if not supported:
            return None
        index: dict[str, Any] = json.loads(body)
        return index
