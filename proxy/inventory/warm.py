"""``pullgate warm``: pre-pull images into the cache through the configured upstreams.

The same ``Mirror`` code the daemon runs does the work (manifest cache, single-flight blob
downloads, digest verification before anything is committed), so a warmed image is exactly
what a pull through the daemon would have cached. Images warm concurrently (``jobs`` at a
time, a few blobs each); an index warms every platform unless ``platforms`` narrows it.

Safe next to a running daemon on the same cache: the store's commits are atomic renames,
the catalog is SQLite (WAL), and opening the store sweeps only temp files whose writing
process is gone (the daemon's downloads in progress stay).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config.settings import Config
from proxy.config.units import format_size
from proxy.errors import ManifestUnknown, PullgateError, UpstreamError
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import Descriptor, ParsedManifest, parse_manifest
from proxy.oci.reference import ImageReference
from proxy.ops.progress import Progress, Task
from proxy.registry.blobs import CachedBlob
from proxy.registry.mirror import Mirror
from proxy.registry.routing import Route

BLOBS_PER_IMAGE = 3
SIGNATURE_SUFFIXES = (".sig", ".att")


class WarmInputInvalid(PullgateError):
    code, status = "BAD_REQUEST", 400


async def open_mirror(config: Config) -> Mirror:
    mirror = Mirror(config)
    await mirror.open()
    return mirror


@dataclass(slots=True)
class WarmResult:
    reference: str
    digest: str | None = None
    platforms: list[str] = field(default_factory=list)
    size: int = 0  # bytes of the image's layers and configs (cache ls adds the manifests)
    fetched: int = 0  # of which downloaded now (the rest was cached)
    seconds: float = 0.0
    attachments: list[str] = field(default_factory=list)  # signature tags warmed too
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "platforms": self.platforms,
            "size": self.size,
            "fetched": self.fetched,
            "seconds": round(self.seconds, 3),
            "attachments": self.attachments,
            "error": self.error,
        }


class Warmer:
    def __init__(
        self,
        mirror: Mirror,
        progress: Progress,
        *,
        platforms: frozenset[str] | None = None,
        jobs: int = 4,
        signatures: bool = False,
    ) -> None:
        self.mirror = mirror
        self.progress = progress
        self.platforms = platforms
        self.jobs = max(jobs, 1)
        self.signatures = signatures

    async def run(self, references: Sequence[str]) -> list[WarmResult]:
        limit = asyncio.Semaphore(self.jobs)

        async def one(text: str) -> WarmResult:
            async with limit:
                return await self.warm(text)

        return list(await asyncio.gather(*(one(text) for text in references)))

    async def warm(self, text: str) -> WarmResult:
        result, started = WarmResult(text), time.monotonic()
        task = self.progress.task(text)
        try:
            ref = ImageReference.parse(text)
            route = self.mirror.route_image(ref)
            reference = str(ref.digest) if ref.digest is not None else str(ref.tag)
            digest, images = await self._manifests(route, reference)
            result.digest = str(digest)
            result.platforms = [p for p, _ in images if p]
            await self._blobs(route, [m for _, m in images], task, result)
            if self.signatures:
                await self._attachments(route, digest, task, result)
        except PullgateError as exc:
            result.error = exc.message
            task.fail(exc.message)
        except TimeoutError:  # the upstream did not start sending a blob in time
            result.error = "timed out waiting for the upstream"
            task.fail(result.error)
        else:
            # result.size counts layers and configs (what warm downloads), not manifests:
            # 'cache ls' shows everything cached for the image, so its SIZE is larger.
            fetched, cached = format_size(result.fetched), format_size(result.size - result.fetched)
            task.finish(
                f"{result.digest}  ({_platforms(result.platforms)}; layers and configs: "
                f"{fetched} fetched, {cached} already cached)"
            )
        result.seconds = time.monotonic() - started
        return result

    async def _manifests(self, route: Route, reference: str) -> tuple[Digest, list[tuple[str, ParsedManifest]]]:
        """The top manifest's digest and the image manifests to warm, with their platforms."""
        top = await self.mirror.manifests.get(route, reference, count=False)
        parsed = parse_manifest(top.data, top.media_type)
        if not parsed.is_index:
            return top.digest, [("", parsed)]
        chosen = [c for c in parsed.children if self.platforms is None or c.platform in self.platforms]
        if not chosen:
            offered = ", ".join(sorted({c.platform or "?" for c in parsed.children}))
            raise ManifestUnknown(f"{reference} offers none of the platforms asked for (it has {offered})")
        images: list[tuple[str, ParsedManifest]] = []
        for child in chosen:
            _, nested = await self._manifests(route, str(child.digest))
            images.extend((child.platform or p, m) for p, m in nested)
        return top.digest, images

    async def _blobs(self, route: Route, manifests: list[ParsedManifest], task: Task, result: WarmResult) -> None:
        wanted = {d.digest: d for m in manifests for d in m.children}
        result.size += sum(d.size for d in wanted.values())
        task.set_total(result.size)
        limit = asyncio.Semaphore(BLOBS_PER_IMAGE)

        async def one(descriptor: Descriptor) -> int:
            async with limit:
                return await self._blob(route, descriptor, task)

        fetched = await asyncio.gather(*(one(d) for d in wanted.values()))
        result.fetched += sum(fetched)

    async def _blob(self, route: Route, descriptor: Descriptor, task: Task) -> int:
        """Bring one blob into the cache; returns the bytes downloaded for it."""
        found = await self.mirror.blobs.get(route, descriptor.digest)
        if isinstance(found, CachedBlob):
            task.advance(found.size)
            return 0
        received = 0
        async for chunk in found.read():
            received += len(chunk)
            task.advance(len(chunk))
        await found.settled()  # the last byte comes once verified; the commit follows
        if self.mirror.store.size(descriptor.digest) is None:
            raise UpstreamError(f"{descriptor.digest} was served but not cached (cache disk full?)")
        return received

    async def _attachments(self, route: Route, digest: Digest, task: Task, result: WarmResult) -> None:
        """Cosign's legacy signature and attestation tags of the image, when upstream has them."""
        for suffix in SIGNATURE_SUFFIXES:
            tag = f"{digest.algorithm}-{digest.hex}{suffix}"
            try:
                _, images = await self._manifests(route, tag)
            except ManifestUnknown:
                continue
            await self._blobs(route, [m for _, m in images], task, result)
            result.attachments.append(tag)


def _platforms(platforms: list[str]) -> str:
    return ", ".join(platforms) if platforms else "single platform"


# --- where the image names come from -------------------------------------------------------
def read_list(path: str) -> list[str]:
    """One image per line; blank lines and ``#`` comments are skipped ('-' = stdin)."""
    text = _read(path)
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WarmInputInvalid(f"cannot read {path}: {exc}") from exc
