"""The catalog's seam: the ``Catalog`` protocol the registry layer talks to, and the records
it answers with.

``LocalCatalog`` (SQLite next to the blob store, ``proxy.registry.catalog.local``) is the one
implementation today; a catalog shared by several replicas (Redis) is meant to implement the
same methods. Everything that may wait on storage is ``async``; what must stay a dictionary
lookup on the hot path (``touch``, ``total_bytes``) is not.

What the records mean:

- a *manifest* is a stored object known to be a manifest (``ManifestInfo``); it belongs to
  the repositories it was pulled or imported for (``has_image``);
- a *proof* says that an upstream has shown that a repository holds a digest — the digest
  was fetched from that exact (upstream, repository), or the upstream answered a HEAD for it
  there, or an operator imported it there. Only a proof lets the shared store serve a digest
  under a repository's name; a manifest that merely *references* a digest proves nothing.
  ``proof`` answers when it was last shown (the caller decides how old is too old).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from proxy.oci.digest import Digest
from proxy.oci.mediatypes import ParsedManifest


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: Digest
    checked: float  # wall-clock time upstream last confirmed this digest


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """Sizes, references and last use of everything stored, for eviction planning."""

    sizes: dict[str, int]  # digest -> bytes, every stored object
    manifests: set[str]  # digests that are manifests
    refs: list[tuple[str, str]]  # (manifest, referenced digest)
    last_used: dict[str, float]  # digest -> last pull (or store) time


class Catalog(Protocol):
    """What the cache knows about its content. Writes are applied to what lookups answer at
    once; ``add_manifest`` returns only once the write is durable, every other write is
    committed in order behind it (``flush`` waits for all of them)."""

    @property
    def total_bytes(self) -> int:
        """Bytes in the store as last counted plus what was added since (quota checks)."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def reconcile(self, present: Iterable[tuple[Digest, int]]) -> int:
        """Agree with the files on disk; returns the rows dropped for vanished files."""
        ...

    # --- tags and manifests --------------------------------------------------------------
    async def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None: ...

    async def set_tag(self, upstream: str, repository: str, tag: str, digest: Digest, checked: float) -> None: ...

    async def manifest(self, digest: Digest) -> ManifestInfo | None: ...

    async def has_image(self, upstream: str, repository: str, digest: Digest) -> bool: ...

    async def add_manifest(
        self, upstream: str, repository: str, digest: Digest, size: int, parsed: ParsedManifest, *, proved: float
    ) -> None:
        """A verified, stored manifest of ``repository`` that its upstream showed at
        ``proved``. Returns once durable; ``CatalogUnavailable`` when that takes too long."""
        ...

    async def parents(self, upstream: str, repository: str, digest: Digest) -> list[Digest]:
        """Manifests of ``repository`` that reference ``digest`` (indexes of a platform)."""
        ...

    async def image_names(self, digest: Digest) -> list[str]:
        """``upstream/repository:tag`` (``@digest`` when untagged) of the images ``digest`` is
        the root of, for operators' messages (``cache_evicted``)."""
        ...

    # --- blobs and proofs ----------------------------------------------------------------
    async def add_blob(self, digest: Digest, size: int) -> None:
        """A blob newly committed to the store."""
        ...

    async def proof(self, upstream: str, repository: str, digest: Digest) -> float | None:
        """When ``upstream`` last showed that ``repository`` holds ``digest``, or None."""
        ...

    async def prove(self, upstream: str, repository: str, digest: Digest, when: float) -> None: ...

    async def disprove(self, upstream: str, repository: str, digest: Digest) -> None:
        """The upstream said ``repository`` does not hold ``digest`` (any more)."""
        ...

    # --- pull statistics -----------------------------------------------------------------
    def touch(self, upstream: str, repository: str, digest: Digest) -> None:
        """Count one pull (a manifest GET) of ``digest``; buffered, written within a second."""
        ...

    async def flush(self) -> bool:
        """Write everything pending; False when that did not finish within the bound."""
        ...

    # --- maintenance -----------------------------------------------------------------------
    async def snapshot(self) -> CatalogSnapshot: ...

    async def forget(self, digests: Iterable[Digest]) -> None:
        """Drop everything known about ``digests`` (evicted; their files go next)."""
        ...

    async def totals(self) -> tuple[int, int]:
        """(bytes, objects) in the store, counted afresh."""
        ...
