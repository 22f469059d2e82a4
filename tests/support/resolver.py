"""An in-process ``TagResolver`` over a dict, standing in for the mirror in webhook tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Literal

from proxy.errors import ManifestUnknown, PullgateError
from proxy.oci.digest import Digest
from proxy.oci.reference import ImageReference
from proxy.registry.manifests import Resolution


def text_digest(text: str) -> Digest:
    return Digest.of(text.encode())


class DictResolver:
    """``"docker.io/library/nginx:1.25"`` -> a digest (made from that text unless given), or
    an exception to raise. Unknown tags raise ``ManifestUnknown`` like the mirror does."""

    def __init__(
        self,
        tags: Mapping[str, Digest | PullgateError | None] | None = None,
        *,
        source: Literal["cache", "upstream"] = "cache",
        delay: float = 0.0,
    ) -> None:
        self.tags = dict(tags or {})
        self.source = source
        self.delay = delay
        self.calls: list[str] = []

    async def resolve(self, ref: ImageReference) -> Resolution:
        key = f"{ref.name}:{ref.tag}"
        self.calls.append(key)
        if self.delay:
            await asyncio.sleep(self.delay)
        if key not in self.tags:
            raise ManifestUnknown(f"manifest unknown: {key}")
        value = self.tags[key]
        if isinstance(value, PullgateError):
            raise value
        return Resolution(value or text_digest(key), self.source)
