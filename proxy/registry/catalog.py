"""What the cache knows about its content: tags, which manifests each repository holds,
what each manifest references, sizes and pull times. Kept in SQLite (WAL) next to the blob
store so it survives restarts and crashes; hot lookups (tags, repository membership) are
answered from memory, mirrored from the database at open.

Writes happen after the blob file is committed, so a row never points at bytes that were not
fully written; ``reconcile`` drops rows whose files vanished.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from proxy.oci.digest import Digest
from proxy.oci.mediatypes import ParsedManifest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,
    is_manifest INTEGER NOT NULL DEFAULT 0, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    last_pulled REAL NOT NULL, pull_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (upstream, repository, digest));
CREATE TABLE IF NOT EXISTS refs (
    parent TEXT NOT NULL, child TEXT NOT NULL, PRIMARY KEY (parent, child));
CREATE INDEX IF NOT EXISTS refs_child ON refs (child);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, checked REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag));
CREATE TABLE IF NOT EXISTS repo_blobs (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest));
"""

ImageKey = tuple[str, str, str]  # (upstream, repository, digest)
_SYNC_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    sizes: dict[str, int]  # digest -> bytes, every stored object
    manifests: set[str]  # digests that are manifests
    refs: list[tuple[str, str]]  # (manifest, referenced digest)
    last_used: dict[str, float]  # digest -> last pull (or store) time


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: Digest
    checked: float  # wall-clock time upstream last confirmed this digest


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._tags: dict[tuple[str, str, str], TagEntry] = {}
        self._images: set[ImageKey] = set()
        self._manifests: dict[str, ManifestInfo] = {}
        self._pulls: dict[ImageKey, tuple[float, int]] = {}
        self.total_bytes = 0
        self._synced = 0.0
        self._version: int | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._load()
        self._version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._db is not None:
            self.flush()
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("catalog is not open")
        return self._db

    def _load(self) -> None:
        self.total_bytes = self.totals()[0]
        self._tags = {
            (u, r, t): TagEntry(Digest.parse(d), c)
            for u, r, t, d, c in self.db.execute("SELECT upstream, repository, tag, digest, checked FROM tags")
        }
        self._images = {(u, r, d) for u, r, d in self.db.execute("SELECT upstream, repository, digest FROM images")}
        self._manifests = {
            d: ManifestInfo(Digest.parse(d), m, s)
            for d, m, s in self.db.execute("SELECT digest, media_type, size FROM blobs WHERE is_manifest = 1")
        }

    def reconcile(self, present: Iterable[tuple[Digest, int]]) -> int:
        """Make the catalog agree with the files on disk after a restart or crash: forget
        blobs whose files are gone (and manifests, images and tags that depended on them),
        and register files that have no row. Returns the rows dropped."""
        on_disk = {str(d): size for d, size in present}
        rows = dict(self.db.execute("SELECT digest, size FROM blobs").fetchall())
        missing = [d for d in rows if d not in on_disk]
        with self.db:
            self.db.execute("BEGIN")
            for digest in missing:
                self._forget(digest)
            now = time.time()
            self.db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, size, added) VALUES (?, ?, ?)",
                [(d, s, now) for d, s in on_disk.items() if d not in rows],
            )
        self._load()
        return len(missing)

    def _forget(self, digest: str) -> None:
        self.db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        self.db.execute("DELETE FROM images WHERE digest = ?", (digest,))
        self.db.execute("DELETE FROM tags WHERE digest = ?", (digest,))
        self.db.execute("DELETE FROM refs WHERE parent = ?", (digest,))
        self.db.execute("DELETE FROM repo_blobs WHERE digest = ?", (digest,))

    def forget(self, digests: Iterable[Digest]) -> None:
        """Drop everything known about ``digests`` (evicted or pruned; files already gone)."""
        keys = {str(d) for d in digests}
        with self.db:
            self.db.execute("BEGIN")
            for key in keys:
                self._forget(key)
        self._load()
        for u, r, key in list(self._pulls):
            if key in keys:
                del self._pulls[(u, r, key)]

    def snapshot(self) -> CatalogSnapshot:
        """Sizes, references and last pull times of everything, for eviction planning."""
        self.flush()
        sizes = {d: s for d, s in self.db.execute("SELECT digest, size FROM blobs")}
        added = {d: a for d, a in self.db.execute("SELECT digest, added FROM blobs")}
        pulled = dict(self.db.execute("SELECT digest, MAX(last_pulled) FROM images GROUP BY digest").fetchall())
        refs = self.db.execute("SELECT parent, child FROM refs").fetchall()
        return CatalogSnapshot(sizes, set(self._manifests), refs, {d: max(added[d], pulled.get(d, 0.0)) for d in sizes})

    # --- tags ----------------------------------------------------------------------------
    # Lookups answer from memory; a miss asks SQLite, because another process (the CLI's
    # ``import``/``warm`` next to a running daemon) may have added rows since we loaded.
    def _sync(self) -> None:
        """Reload the memory maps when another process (``import``, ``prune``) committed:
        SQLite's ``data_version`` changes only for other connections' commits. Checked at
        most once a second, so the hot path stays a dictionary lookup."""
        now = time.monotonic()
        if now - self._synced < _SYNC_INTERVAL:
            return
        self._synced = now
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._version = version
            self._load()

    def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        self._sync()
        found = self._tags.get((upstream, repository, tag))
        if found is None:
            row = self.db.execute(
                "SELECT digest, checked FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
                (upstream, repository, tag),
            ).fetchone()
            if row is not None:
                found = self._tags[(upstream, repository, tag)] = TagEntry(Digest.parse(row[0]), row[1])
        return found

    def set_tag(self, upstream: str, repository: str, tag: str, digest: Digest, checked: float) -> None:
        self._tags[(upstream, repository, tag)] = TagEntry(digest, checked)
        self.db.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
            (upstream, repository, tag, str(digest), checked),
        )

    def tags_of(self, upstream: str, repository: str, digest: Digest) -> list[str]:
        return sorted(
            t for (u, r, t), e in self._tags.items() if (u, r) == (upstream, repository) and e.digest == digest
        )

    # --- manifests and images ----------------------------------------------------------
    def manifest(self, digest: Digest) -> ManifestInfo | None:
        found = self._manifests.get(str(digest))
        if found is None:
            row = self.db.execute(
                "SELECT media_type, size FROM blobs WHERE digest = ? AND is_manifest = 1", (str(digest),)
            ).fetchone()
            if row is not None:
                found = self._manifests[str(digest)] = ManifestInfo(digest, row[0], row[1])
        return found

    def has_image(self, upstream: str, repository: str, digest: Digest) -> bool:
        key = (upstream, repository, str(digest))
        if (
            key not in self._images
            and self.db.execute(
                "SELECT 1 FROM images WHERE upstream = ? AND repository = ? AND digest = ?", key
            ).fetchone()
        ):
            self._images.add(key)
        return key in self._images

    def add_manifest(self, upstream: str, repository: str, digest: Digest, size: int, parsed: ParsedManifest) -> None:
        """Record a verified, committed manifest as part of ``repository``."""
        key = str(digest)
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT OR REPLACE INTO blobs (digest, size, media_type, is_manifest, added) VALUES (?, ?, ?, 1, ?)",
                (key, size, parsed.media_type, now),
            )
            self.db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, 0)", (upstream, repository, key, now))
            self.db.executemany(
                "INSERT OR IGNORE INTO refs VALUES (?, ?)", [(key, str(c.digest)) for c in parsed.children]
            )
        if key not in self._manifests:
            self.total_bytes += size
        self._manifests[key] = ManifestInfo(digest, parsed.media_type, size)
        self._images.add((upstream, repository, key))

    def parents(self, upstream: str, repository: str, digest: Digest) -> list[Digest]:
        """Manifests of ``repository`` that reference ``digest`` (indexes listing a
        platform manifest)."""
        rows = self.db.execute(
            """SELECT refs.parent FROM refs JOIN images ON images.digest = refs.parent
               WHERE refs.child = ? AND images.upstream = ? AND images.repository = ?""",
            (str(digest), upstream, repository),
        ).fetchall()
        return [Digest.parse(row[0]) for row in rows]

    def add_blob(self, digest: Digest, size: int) -> None:
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO blobs (digest, size, added) VALUES (?, ?, ?)", (str(digest), size, time.time())
        )
        self.total_bytes += size if cursor.rowcount else 0

    def link_blob(self, upstream: str, repository: str, digest: Digest) -> None:
        """Upstream confirmed that ``repository`` holds ``digest`` (a HEAD or GET succeeded)."""
        self.db.execute("INSERT OR IGNORE INTO repo_blobs VALUES (?, ?, ?)", (upstream, repository, str(digest)))

    def blob_allowed(self, upstream: str, repository: str, digest: Digest) -> bool:
        """May ``digest`` be served for ``repository``? Only when a manifest of that repository
        references it, or upstream confirmed the repository holds it: the store is shared,
        but one repository's digests must not leak through another's name."""
        row = self.db.execute(
            """SELECT 1 FROM refs JOIN images ON images.digest = refs.parent
               WHERE refs.child = ? AND images.upstream = ? AND images.repository = ?
               UNION ALL SELECT 1 FROM repo_blobs WHERE digest = ? AND upstream = ? AND repository = ?
               LIMIT 1""",
            (str(digest), upstream, repository, str(digest), upstream, repository),
        ).fetchone()
        return row is not None

    # --- pull statistics (buffered: one write per flush, not per request) --------------
    def touch(self, upstream: str, repository: str, digest: Digest) -> None:
        key = (upstream, repository, str(digest))
        _, count = self._pulls.get(key, (0.0, 0))
        self._pulls[key] = (time.time(), count + 1)

    def flush(self) -> None:
        if not self._pulls or self._db is None:
            return
        pulls, self._pulls = self._pulls, {}
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE images SET last_pulled = ?, pull_count = pull_count + ? "
                "WHERE upstream = ? AND repository = ? AND digest = ?",
                [(t, n, u, r, d) for (u, r, d), (t, n) in pulls.items()],
            )

    def totals(self) -> tuple[int, int]:
        size, count = self.db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs").fetchone()
        return int(size), int(count)
