"""The catalog's writes as data: each ``Op`` is one change, ``CatalogDatabase.write`` applies
a list of them in one transaction (``sql``), and ``LocalCatalog`` queues them while another
process holds the write lock. A shared catalog would replay the same ops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AddBlob:
    digest: str
    size: int
    added: float


@dataclass(frozen=True, slots=True)
class AddManifest:
    upstream: str
    repository: str
    digest: str
    size: int
    media_type: str
    children: tuple[str, ...]
    added: float


@dataclass(frozen=True, slots=True)
class SetTag:
    upstream: str
    repository: str
    tag: str
    digest: str
    checked: float


@dataclass(frozen=True, slots=True)
class Prove:
    upstream: str
    repository: str
    digest: str
    checked: float


@dataclass(frozen=True, slots=True)
class Disprove:
    upstream: str
    repository: str
    digest: str


@dataclass(frozen=True, slots=True)
class CountPulls:
    pulls: tuple[tuple[str, str, str, float, int], ...]  # (upstream, repository, digest, last, count)


@dataclass(frozen=True, slots=True)
class Forget:
    digests: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DropImage:
    """``cache prune``: the repository no longer lists this manifest (nor tags pointing at it)."""

    upstream: str
    repository: str
    digest: str


Op = AddBlob | AddManifest | SetTag | Prove | Disprove | CountPulls | Forget | DropImage
