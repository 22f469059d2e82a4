"""What the cache holds, in operators' terms: images with their tags, platforms, sizes and
pull statistics (``cache ls``; ``proxy.inventory.listing`` shows them and builds ``cache inspect``),
disk usage and what layer sharing saves (``cache du``), and pruning (``cache prune``).
``export`` finds its images here too.

An *image* is a root manifest of one (upstream, repository): a manifest of that repository
that no other manifest of it references — an index, or a single-platform manifest — with
everything it references. Queries read one snapshot of the catalog's tables
(``CatalogDatabase.inventory``), so they work with or without the daemon running; a daemon
writing meanwhile is seen on the next ``load``. A daemon counts a pull about a second after
it happened (it batches them); an image never pulled (imported, warmed) shows no pull time.

Cosign's legacy signature/attestation tags (``sha256-<hex>.sig``, ``.att``, ``.sbom``, and
``sha256-<hex>`` for the OCI 1.1 referrers fallback) and manifests with a ``subject`` are
*attachments* of the image they name: hidden from ``ls`` unless asked for, exported with
their image, and pruned only together with it (content trust must keep working offline).
A signature-shaped tag makes an attachment only of a signature object
(``proxy.oci.artifacts``): an image pushed under ``sha256-<hex>.sig`` stays an image.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any

from proxy.config.settings import UpstreamConfig
from proxy.errors import ManifestInvalid, PullgateError
from proxy.oci import jsondoc
from proxy.oci.artifacts import is_signature_object
from proxy.oci.digest import Digest
from proxy.oci.globs import GlobSet
from proxy.oci.mediatypes import ParsedManifest, parse_manifest
from proxy.oci.reference import ImageReference
from proxy.registry.catalog import PINNED as PINNED  # the pin time of imports, re-exported
from proxy.registry.catalog import CatalogDatabase
from proxy.registry.catalog.ops import DropImage, Forget
from proxy.registry.routing import Router, registry_name
from proxy.registry.store import BlobStore

SIGNATURE_TAG = re.compile(r"^sha256-([0-9a-f]{64})(?:\.(?:sig|att|sbom))?$")
ORPHAN_GRACE = 3600.0  # unreferenced blobs younger than this may be about to get a manifest
_MAX_JSON = 4 << 20

RowKey = tuple[str, str]  # (upstream, repository)


class ImageNotCached(PullgateError):
    code, status = "MANIFEST_UNKNOWN", 404


@dataclass(frozen=True, slots=True)
class Image:
    registry: str
    upstream: str
    repository: str
    digest: str
    media_type: str
    tags: tuple[str, ...]
    platforms: tuple[str, ...]  # offered: index entries, or the image config's os/arch
    missing_platforms: tuple[str, ...]  # index entries whose manifest is not cached
    size: int  # bytes of everything cached for this image
    complete: bool  # every object it references is cached
    last_pulled: float
    pull_count: int
    subject: str | None = None  # set for attachments: the digest they sign or describe

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def reference(self, tag: str | None = None) -> str:
        tag = tag or (self.tags[0] if self.tags else None)
        return f"{self.name}:{tag}" if tag else f"{self.name}@{self.digest}"

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "registry"}
        return {"reference": self.reference(), **values, "last_pulled": _iso(self.last_pulled)}


@dataclass(slots=True)
class Snapshot:
    """The catalog's tables at one moment, with the reference graph."""

    sizes: dict[str, int] = field(default_factory=dict)
    added: dict[str, float] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)  # digest -> media type
    children: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    rows: dict[RowKey, dict[str, tuple[float, int]]] = field(default_factory=lambda: defaultdict(dict))
    tags: dict[RowKey, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    pinned: set[tuple[str, str, str]] = field(default_factory=set)  # (upstream, repository, digest) tagged by import

    @classmethod
    def read(cls, catalog: CatalogDatabase) -> Snapshot:
        snap, rows = cls(), catalog.inventory()
        for digest, size, media_type, is_manifest, added in rows.blobs:
            snap.sizes[digest], snap.added[digest] = size, added
            if is_manifest:
                snap.manifests[digest] = media_type or ""
        for parent, child in rows.refs:
            snap.children[parent].append(child)
        for u, r, d, last, count in rows.images:
            snap.rows[(u, r)][d] = (last, count)
        for u, r, tag, d, checked in rows.tags:
            snap.tags[(u, r)][d].append(tag)
            if checked >= PINNED:
                snap.pinned.add((u, r, d))
        return snap

    def closure(self, roots: set[str] | list[str]) -> set[str]:
        """Every digest reachable from ``roots`` (cached or not)."""
        seen, stack = set(roots), list(roots)
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen

    def roots(self, key: RowKey) -> list[str]:
        members = self.rows.get(key, {})
        referenced = {c for d in members for c in self.children.get(d, ()) if c in members}
        return sorted(d for d in members if d not in referenced)

    def size_of(self, digests: set[str]) -> int:
        return sum(self.sizes.get(d, 0) for d in digests)


class Inventory:
    def __init__(
        self, store: BlobStore, catalog: CatalogDatabase, router: Router, upstreams: tuple[UpstreamConfig, ...]
    ):
        self.store = store
        self.catalog = catalog
        self.router = router
        self._registries = {u.name: registry_name(u) for u in upstreams}
        self.snap = Snapshot()

    def load(self) -> Inventory:
        self.snap = Snapshot.read(self.catalog)
        return self

    # --- objects -----------------------------------------------------------------------------
    def manifest(self, digest: str) -> ParsedManifest | None:
        media_type = self.snap.manifests.get(digest)
        data = self.store.read_blocking(Digest.parse(digest)) if media_type is not None else None
        if data is None:
            return None
        try:
            return parse_manifest(data, media_type)
        except ManifestInvalid:
            return None

    def json_blob(self, digest: str) -> dict[str, Any] | None:
        """A small JSON object from the store (manifest, config), or None."""
        if self.snap.sizes.get(digest, _MAX_JSON + 1) > _MAX_JSON:
            return None
        data = self.store.read_blocking(Digest.parse(digest))
        try:
            return jsondoc.parse_object(data, digest, max_bytes=_MAX_JSON) if data is not None else None
        except jsondoc.JsonInvalid:
            return None

    # --- images ------------------------------------------------------------------------------
    def images(self, repositories: GlobSet | None = None, *, attachments: bool = False) -> list[Image]:
        found = []
        for key in sorted(self.snap.rows):
            if repositories and not self._matches(repositories, key):
                continue
            for root in self.snap.roots(key):
                image = self.image(key, root)
                if attachments or image.subject is None:
                    found.append(image)
        return found

    def image(self, key: RowKey, digest: str) -> Image:
        upstream, repository = key
        parsed = self.manifest(digest)
        members = self.snap.closure([digest])
        present = {d for d in members if d in self.snap.sizes}
        rows = self.snap.rows.get(key, {})
        last, count = rows.get(digest, (0.0, 0))
        tags = tuple(self.snap.tags.get(key, {}).get(digest, ()))
        platforms, missing = self._platforms(parsed)
        return Image(
            registry=self._registries.get(upstream, upstream),
            upstream=upstream,
            repository=repository,
            digest=digest,
            media_type=self.snap.manifests.get(digest, ""),
            tags=tags,
            platforms=platforms,
            missing_platforms=missing,
            size=self.snap.size_of(present),
            complete=parsed is not None and present == members,
            last_pulled=max((rows[d][0] for d in members if d in rows), default=last),
            pull_count=count,
            subject=self._subject(tags, parsed, digest),
        )

    def _subject(self, tags: tuple[str, ...], parsed: ParsedManifest | None, digest: str) -> str | None:
        """The digest an attachment belongs to; None for an image."""
        if parsed is not None and parsed.subject is not None:
            return str(parsed.subject)
        matches = [SIGNATURE_TAG.match(t) for t in tags]
        if not tags or not all(matches) or matches[0] is None:
            return None
        data = self.store.read_blocking(Digest.parse(digest))
        if data is None or not is_signature_object(data, self.snap.manifests.get(digest)):
            return None  # the tag's shape proves nothing about the content (issue 13)
        return f"sha256:{matches[0].group(1)}"

    def _platforms(self, parsed: ParsedManifest | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if parsed is None:
            return (), ()
        if parsed.is_index:
            offered = [c for c in parsed.children if c.platform and c.platform != "unknown/unknown"]
            missing = tuple(c.platform or "" for c in offered if str(c.digest) not in self.snap.manifests)
            return tuple(c.platform or "" for c in offered), missing
        config = self.json_blob(str(parsed.children[0].digest)) if parsed.children else None
        if config is None or not isinstance(config.get("os"), str):
            return (), ()
        parts = (config.get("os"), config.get("architecture"), config.get("variant"))
        return ("/".join(str(p) for p in parts if p),), ()

    def locate(self, text: str) -> Image:
        """The cached image ``text`` names (tag or digest), or ``ImageNotCached``."""
        ref = ImageReference.parse(text)
        route = self.router.route_image(ref)
        key = (route.upstream, route.repository)
        digest = str(ref.digest) if ref.digest is not None else None
        if digest is None:
            assert ref.tag is not None
            entry = self.catalog.tag(route.upstream, route.repository, ref.tag)
            digest = str(entry.digest) if entry is not None else None
        if digest is None or digest not in self.snap.rows.get(key, {}) or digest not in self.snap.manifests:
            raise ImageNotCached(f"image not cached: {text} (pull it through the mirror or run 'pullgate warm' first)")
        return self.image(key, digest)

    def attachments(self, image: Image) -> list[Image]:
        """Signatures, attestations and referrers of ``image`` (or of its platform manifests)
        that the cache holds in the same repository."""
        key = (image.upstream, image.repository)
        subjects = {d for d in self.snap.closure([image.digest]) if d in self.snap.manifests}
        found = []
        for root in self.snap.roots(key):
            candidate = self.image(key, root)
            if candidate.subject in subjects and root != image.digest:
                found.append(candidate)
        return found

    def _matches(self, globs: GlobSet, key: RowKey) -> bool:
        upstream, repository = key
        return globs.match(repository) or globs.match(f"{self._registries.get(upstream, upstream)}/{repository}")

    # --- disk usage ----------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        """Bytes per repository, and what layer sharing saves: ``logical`` counts every image
        whole (what a store without sharing would hold), ``stored`` each object once."""
        repositories, referenced, logical = [], set(), 0
        for key in sorted(self.snap.rows):
            roots = self.snap.roots(key)
            union = {d for d in self.snap.closure(roots) if d in self.snap.sizes}
            whole = sum(self.snap.size_of(self.snap.closure([r])) for r in roots)
            referenced |= union
            logical += whole
            repositories.append(
                {
                    "upstream": key[0],
                    "repository": key[1],
                    "images": len(roots),
                    "size": self.snap.size_of(union),
                    "logical": whole,
                }
            )
        stored = self.snap.size_of(referenced)
        on_disk = sum(self.snap.sizes.values())
        return {
            "repositories": repositories,
            "stored": stored,
            "logical": logical,
            "savings": logical - stored,
            "unreferenced": on_disk - stored,
            "on_disk": on_disk,
            "objects": len(self.snap.sizes),
        }

    # --- pruning -------------------------------------------------------------------------------
    def plan_prune(
        self,
        older_than: float | None,
        repositories: GlobSet | None,
        now: float | None = None,
        *,
        include_pinned: bool = False,
    ) -> PrunePlan:
        """What ``prune`` removes: images not pulled for ``older_than`` seconds and/or in
        ``repositories`` (nothing if neither is given), their attachments, then every object no
        kept manifest references (unreferenced ones only once older than ``ORPHAN_GRACE``).
        Images tagged by ``import`` (pinned: an air-gapped site has no upstream to pull them
        from again) are kept, and listed as kept, unless ``include_pinned``."""
        now = time.time() if now is None else now
        chosen: list[Image] = []
        kept_pinned: list[Image] = []
        rows: set[tuple[str, str, str]] = set()
        for key in sorted(self.snap.rows):
            picked = self._select(key, older_than, repositories, now)
            if not include_pinned:
                pinned = {i.digest for i in picked if self._pinned(key, i)}
                kept_pinned.extend(i for i in picked if i.digest in pinned and i.subject is None)
                picked = [i for i in picked if i.digest not in pinned and not self._held_by(key, i, pinned)]
            chosen.extend(picked)
            rows |= self._rows_of(key, picked)
        kept = [d for key, members in self.snap.rows.items() for d in members if (*key, d) not in rows]
        reachable = self.snap.closure(kept)
        released = self.snap.closure([d for _, _, d in rows])
        blobs = sorted(
            d
            for d in self.snap.sizes
            if d not in reachable and (d in released or self.snap.added.get(d, now) < now - ORPHAN_GRACE)
        )
        return PrunePlan(
            tuple(chosen), tuple(sorted(rows)), tuple(blobs), self.snap.size_of(set(blobs)), tuple(kept_pinned)
        )

    def _pinned(self, key: RowKey, image: Image) -> bool:
        return any((*key, d) in self.snap.pinned for d in self.snap.closure([image.digest]))

    def _held_by(self, key: RowKey, image: Image, pinned: set[str]) -> bool:
        """An attachment (signature) of a pinned image stays with it."""
        return image.subject is not None and any(image.subject in self.snap.closure([d]) for d in pinned)

    def _select(self, key: RowKey, older_than: float | None, globs: GlobSet | None, now: float) -> list[Image]:
        if (older_than is None and not globs) or (globs and not self._matches(globs, key)):
            return []
        images = [self.image(key, root) for root in self.snap.roots(key)]

        def wanted(image: Image) -> bool:
            # Never pulled (imported, warmed): as old as the time it was stored.
            used = image.last_pulled or self.snap.added.get(image.digest, now)
            old = older_than is None or used < now - older_than
            return old and (not globs or self._matches(globs, key))

        plain = {i.digest: wanted(i) for i in images if i.subject is None}
        holders = {d: i.digest for i in images if i.subject is None for d in self.snap.closure([i.digest])}
        chosen = []
        for image in images:
            if image.subject is None:
                selected = plain[image.digest]
            elif image.subject in holders:  # an attachment goes with the image it is attached to
                selected = plain[holders[image.subject]]
            else:
                selected = wanted(image)
            if selected:
                chosen.append(image)
        return chosen

    def _rows_of(self, key: RowKey, picked: list[Image]) -> set[tuple[str, str, str]]:
        """The repository's manifest rows the picked images need and no kept image needs."""
        members = self.snap.rows.get(key, {})
        gone = {i.digest for i in picked}
        kept = self.snap.closure([r for r in self.snap.roots(key) if r not in gone])
        return {(*key, d) for d in self.snap.closure(list(gone)) if d in members and d not in kept}

    def prune(self, plan: PrunePlan) -> int:
        """Apply ``plan``; returns the bytes freed. Catalog rows go first (no manifest row may
        point at deleted bytes), then each object still unreferenced after a fresh look."""
        self.catalog.write([DropImage(*row) for row in plan.rows])
        self.load()  # the daemon may have added manifests since the plan was made
        reachable = self.snap.closure([d for members in self.snap.rows.values() for d in members])
        doomed = [d for d in plan.blobs if d not in reachable]
        self.catalog.write([Forget(tuple(doomed))])  # a running daemon notices within a second
        freed = sum(self.store.remove_blocking(Digest.parse(d)) for d in doomed)
        self.load()
        return freed


@dataclass(frozen=True, slots=True)
class PrunePlan:
    images: tuple[Image, ...]  # root images whose catalog entries go
    rows: tuple[tuple[str, str, str], ...]  # (upstream, repository, manifest digest) rows removed
    blobs: tuple[str, ...]  # stored objects deleted
    bytes: int
    kept_pinned: tuple[Image, ...] = ()  # selected, but kept: pinned by import

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [i.to_json() for i in self.images],
            "kept_pinned": [i.to_json() for i in self.kept_pinned],
            "objects": len(self.blobs),
            "bytes": self.bytes,
        }


def _iso(timestamp: float) -> str | None:
    if timestamp <= 0:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(timestamp, PINNED)))
