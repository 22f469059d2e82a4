"""``catalog.db``: the SQLite file next to the blob store, and every SQL statement run on it.

``CatalogDatabase`` is synchronous and owns one connection. The daemon never calls it on
the event loop: ``LocalCatalog`` runs one instance per thread (a writer and a reader). The
CLI tools (``cache ls/inspect/du/prune``, ``import``) call it directly; several processes
share the file (WAL: readers never wait for a writer; one writer at a time).

Writes are data: ``write`` applies a list of ``Op`` records in one ``BEGIN IMMEDIATE``
transaction, so a batch is all-or-nothing, and the daemon can queue ops while another
process holds the write lock. A lock held past the busy timeout raises
``CatalogUnavailable`` (never SQLite's bare "database is locked").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import CatalogLocked, CatalogUnavailable
from proxy.oci.digest import Digest
from proxy.registry.catalog.interface import CatalogSnapshot, ManifestInfo, TagEntry
from proxy.registry.catalog.ops import (
    AddBlob,
    AddManifest,
    CountPulls,
    Disprove,
    DropImage,
    Forget,
    Op,
    Prove,
    SetTag,
)

PINNED = 253402300799.0  # 9999-12-31: the "checked" time of what ``import`` pins (tags, proofs)
SCHEMA_VERSION = 2
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})

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
CREATE TABLE IF NOT EXISTS proofs (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL, checked REAL NOT NULL,
    PRIMARY KEY (upstream, repository, digest));
"""

# Version 1 let a manifest of a repository vouch for every digest it references
# (``repo_blobs`` held only upstream confirmations). Version 2 keeps proofs only: what was
# confirmed and the repository's own manifests become proofs to re-check (checked = 0),
# imports stay pinned, and rows for never-pulled images stop claiming a pull time.
_MIGRATE_1_TO_2 = f"""
INSERT OR IGNORE INTO proofs SELECT upstream, repository, digest, 0 FROM repo_blobs;
INSERT OR IGNORE INTO proofs SELECT upstream, repository, digest, 0 FROM images;
INSERT OR REPLACE INTO proofs
    WITH RECURSIVE pinned(upstream, repository, digest) AS (
        SELECT upstream, repository, digest FROM tags WHERE checked >= {PINNED}
        UNION SELECT p.upstream, p.repository, refs.child FROM pinned p JOIN refs ON refs.parent = p.digest)
    SELECT upstream, repository, digest, {PINNED} FROM pinned;
DROP TABLE repo_blobs;
UPDATE images SET last_pulled = 0 WHERE pull_count = 0;
"""


# --- what bulk reads return -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Loaded:
    """What the daemon keeps in memory: every tag, repository membership and manifest."""

    tags: dict[tuple[str, str, str], TagEntry]
    images: set[tuple[str, str, str]]
    manifests: dict[str, ManifestInfo]
    total_bytes: int


@dataclass(slots=True)
class InventoryRows:
    """Every table at one moment, for the cache tools (``proxy.inventory``)."""

    # (digest, size, media type, is a manifest, added)
    blobs: list[tuple[str, int, str | None, bool, float]] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)
    images: list[tuple[str, str, str, float, int]] = field(default_factory=list)  # u, r, digest, last pulled, count
    tags: list[tuple[str, str, str, str, float]] = field(default_factory=list)  # u, r, tag, digest, checked


class CatalogDatabase:
    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def open(self) -> CatalogDatabase:
        # check_same_thread off: the CLI hands the connection to a worker thread (import);
        # every user still calls it from one thread at a time.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.set_busy_timeout(self._busy_timeout)
        with _errors():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("catalog is not open")
        return self._db

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a statement waits for another process's lock before giving up."""
        self.db.execute(f"PRAGMA busy_timeout = {max(int(seconds * 1000), 0)}")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        with self._transaction():
            # statement by statement: executescript() would COMMIT the transaction
            for statement in _statements(_SCHEMA):
                self.db.execute(statement)
            legacy = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'repo_blobs'").fetchone()
            if legacy is not None:
                for statement in _statements(_MIGRATE_1_TO_2):
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with _errors():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # --- writes ------------------------------------------------------------------------------
    def write(self, ops: Sequence[Op]) -> None:
        """Apply ``ops`` in one transaction."""
        if not ops:
            return
        with self._transaction():
            for op in ops:
                self._apply(op)

    def _apply(self, op: Op) -> None:
        db = self.db
        match op:
            case AddBlob(digest, size, added):
                db.execute("INSERT OR IGNORE INTO blobs (digest, size, added) VALUES (?, ?, ?)", (digest, size, added))
            case AddManifest(upstream, repository, digest, size, media_type, children, added):
                db.execute(
                    "INSERT INTO blobs (digest, size, media_type, is_manifest, added) VALUES (?, ?, ?, 1, ?) "
                    "ON CONFLICT (digest) DO UPDATE SET media_type = excluded.media_type, is_manifest = 1",
                    (digest, size, media_type, added),
                )
                db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, 0, 0)", (upstream, repository, digest))
                db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)", [(digest, c) for c in children])
            case SetTag(upstream, repository, tag, digest, checked):
                db.execute(
                    "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)", (upstream, repository, tag, digest, checked)
                )
            case Prove(upstream, repository, digest, checked):
                # A pinned proof (import) is never lowered by a later upstream confirmation.
                db.execute(
                    "INSERT INTO proofs VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                    "SET checked = MAX(checked, excluded.checked)",
                    (upstream, repository, digest, checked),
                )
            case Disprove(upstream, repository, digest):
                db.execute(
                    "DELETE FROM proofs WHERE upstream = ? AND repository = ? AND digest = ?",
                    (upstream, repository, digest),
                )
            case CountPulls(pulls):
                db.executemany(
                    "UPDATE images SET last_pulled = MAX(last_pulled, ?), pull_count = pull_count + ? "
                    "WHERE upstream = ? AND repository = ? AND digest = ?",
                    [(last, count, u, r, d) for u, r, d, last, count in pulls],
                )
            case Forget(digests):
                for digest in digests:
                    self._forget(digest)
            case DropImage(upstream, repository, digest):
                key = (upstream, repository, digest)
                db.execute("DELETE FROM images WHERE upstream = ? AND repository = ? AND digest = ?", key)
                db.execute("DELETE FROM tags WHERE upstream = ? AND repository = ? AND digest = ?", key)

    def _forget(self, digest: str) -> None:
        for statement in (
            "DELETE FROM blobs WHERE digest = ?",
            "DELETE FROM images WHERE digest = ?",
            "DELETE FROM tags WHERE digest = ?",
            "DELETE FROM refs WHERE parent = ?",
            "DELETE FROM proofs WHERE digest = ?",
        ):
            self.db.execute(statement, (digest,))

    def reconcile(self, present: Iterable[tuple[Digest, int]], now: float) -> int:
        """Forget rows whose files vanished (and what depended on them); register files that
        have no row. Returns the rows dropped."""
        on_disk = {str(d): size for d, size in present}
        with self._transaction():
            rows = dict(self.db.execute("SELECT digest, size FROM blobs").fetchall())
            missing = [d for d in rows if d not in on_disk]
            for digest in missing:
                self._forget(digest)
            self.db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, size, added) VALUES (?, ?, ?)",
                [(d, s, now) for d, s in on_disk.items() if d not in rows],
            )
        return len(missing)

    # --- reads -------------------------------------------------------------------------------
    def data_version(self) -> int:
        """Changes whenever *another* connection committed (SQLite's ``data_version``)."""
        with _errors():
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def load(self) -> Loaded:
        with _errors():
            db = self.db
            tags = {
                (u, r, t): TagEntry(Digest.parse(d), c)
                for u, r, t, d, c in db.execute("SELECT upstream, repository, tag, digest, checked FROM tags")
            }
            images = {(u, r, d) for u, r, d in db.execute("SELECT upstream, repository, digest FROM images")}
            manifests = {
                d: ManifestInfo(Digest.parse(d), m, s)
                for d, m, s in db.execute("SELECT digest, media_type, size FROM blobs WHERE is_manifest = 1")
            }
            size = db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
        return Loaded(tags, images, manifests, int(size))

    def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        with _errors():
            row = self.db.execute(
                "SELECT digest, checked FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
                (upstream, repository, tag),
            ).fetchone()
        return TagEntry(Digest.parse(row[0]), row[1]) if row is not None else None

    def manifest(self, digest: str) -> ManifestInfo | None:
        with _errors():
            row = self.db.execute(
                "SELECT media_type, size FROM blobs WHERE digest = ? AND is_manifest = 1", (digest,)
            ).fetchone()
        return ManifestInfo(Digest.parse(digest), row[0], row[1]) if row is not None else None

    def has_image(self, upstream: str, repository: str, digest: str) -> bool:
        with _errors():
            row = self.db.execute(
                "SELECT 1 FROM images WHERE upstream = ? AND repository = ? AND digest = ?",
                (upstream, repository, digest),
            ).fetchone()
        return row is not None

    def proofs(self, digest: str) -> dict[tuple[str, str], float]:
        """Every (upstream, repository) shown to hold ``digest``, and when."""
        with _errors():
            rows = self.db.execute("SELECT upstream, repository, checked FROM proofs WHERE digest = ?", (digest,))
            return {(u, r): float(c) for u, r, c in rows}

    def parents(self, upstream: str, repository: str, digest: str) -> list[str]:
        with _errors():
            rows = self.db.execute(
                """SELECT refs.parent FROM refs JOIN images ON images.digest = refs.parent
                   WHERE refs.child = ? AND images.upstream = ? AND images.repository = ?""",
                (digest, upstream, repository),
            ).fetchall()
        return [row[0] for row in rows]

    def image_names(self, digest: str) -> list[str]:
        """``upstream/repository:tag`` (``@digest`` when untagged) of every image ``digest`` is."""
        with _errors():
            rows = self.db.execute(
                "SELECT i.upstream, i.repository, t.tag FROM images i LEFT JOIN tags t ON t.upstream = i.upstream"
                " AND t.repository = i.repository AND t.digest = i.digest WHERE i.digest = ?",
                (digest,),
            ).fetchall()
        return sorted(f"{u}/{r}:{tag}" if tag else f"{u}/{r}@{digest}" for u, r, tag in rows)

    def totals(self) -> tuple[int, int]:
        with _errors():
            size, count = self.db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs").fetchone()
        return int(size), int(count)

    def eviction_snapshot(self) -> CatalogSnapshot:
        with _errors():
            db = self.db
            db.execute("BEGIN")  # one read transaction: the four queries see one state
            try:
                blobs = db.execute("SELECT digest, size, added, is_manifest FROM blobs").fetchall()
                pulled = dict(db.execute("SELECT digest, MAX(last_pulled) FROM images GROUP BY digest").fetchall())
                refs = db.execute("SELECT parent, child FROM refs").fetchall()
            finally:
                db.execute("COMMIT")
        return CatalogSnapshot(
            sizes={d: s for d, s, _, _ in blobs},
            manifests={d for d, _, _, m in blobs if m},
            refs=[(p, c) for p, c in refs],
            last_used={d: max(a, pulled.get(d, 0.0)) for d, _, a, _ in blobs},
        )

    def inventory(self) -> InventoryRows:
        rows = InventoryRows()
        with _errors():
            db = self.db
            db.execute("BEGIN")
            try:
                for digest, size, media_type, is_manifest, added in db.execute(
                    "SELECT digest, size, media_type, is_manifest, added FROM blobs"
                ):
                    rows.blobs.append((digest, size, media_type, bool(is_manifest), added))
                rows.refs = db.execute("SELECT parent, child FROM refs").fetchall()
                rows.images = db.execute(
                    "SELECT upstream, repository, digest, last_pulled, pull_count FROM images"
                ).fetchall()
                rows.tags = db.execute(
                    "SELECT upstream, repository, tag, digest, checked FROM tags ORDER BY tag"
                ).fetchall()
            finally:
                db.execute("COMMIT")
        return rows


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


@contextmanager
def _errors() -> Iterator[None]:
    """SQLite's errors as the error tree's: a lock another process holds past the busy
    timeout, or a failing database, is ``CatalogUnavailable`` (503 with ``Retry-After``)."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) in _BUSY or "locked" in str(exc):
            raise CatalogLocked("the cache catalog is locked by another process (cache prune or import?)") from exc
        raise CatalogUnavailable(f"the cache catalog failed: {exc}") from exc
