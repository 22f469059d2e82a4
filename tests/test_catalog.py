"""The catalog on a real SQLite file: ``LocalCatalog`` (the daemon's, async, memory first) and
``CatalogDatabase`` (every SQL statement; what the CLI tools and "another process" use).

Another process is another connection to the same file, as ``pullgate cache prune`` and
``import`` are next to a running daemon. Times come from an injected clock."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from proxy.errors import CatalogLocked, CatalogUnavailable
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import OCI_INDEX, OCI_MANIFEST, ParsedManifest, parse_manifest
from proxy.registry.catalog import PINNED, CatalogDatabase, LocalCatalog
from proxy.registry.catalog.ops import AddManifest, DropImage, Forget, Op, Prove, SetTag
from tests.support.cacheparts import Clock
from tests.support.polling import eventually

U, R = "docker.io", "library/app"
LOCK_WAIT = 0.3


def digest(text: str) -> Digest:
    return Digest.of(text.encode())


def manifest(*children: Digest, index: bool = False) -> tuple[Digest, bytes, ParsedManifest]:
    if index:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
               "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(c), "size": 1} for c in children]}  # fmt: skip
    else:
        layer = "application/vnd.oci.image.layer.v1.tar+gzip"
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(children[0]),
                          "size": 1},
               "layers": [{"mediaType": layer, "digest": str(c), "size": 1} for c in children[1:]]}  # fmt: skip
    data = json.dumps(doc).encode()
    return Digest.of(data), data, parse_manifest(data, None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def catalog(tmp_path: Path, clock: Clock) -> AsyncIterator[LocalCatalog]:
    opened = LocalCatalog(tmp_path / "catalog.db", clock=clock, lock_wait=LOCK_WAIT, sync_interval=0.0)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def other(tmp_path: Path, catalog: LocalCatalog) -> Iterator[CatalogDatabase]:
    """Another process's connection to the same file (``cache prune``, ``import``)."""
    database = CatalogDatabase(tmp_path / "catalog.db", busy_timeout=0.1).open()
    yield database
    database.close()


async def reopened(tmp_path: Path, clock: Clock) -> LocalCatalog:
    again = LocalCatalog(tmp_path / "catalog.db", clock=clock, lock_wait=LOCK_WAIT)
    await again.open()
    return again


# --- what is written is answered, at once and after a restart ---------------------------------
async def test_writes_are_answered_at_once_and_survive_a_restart(
    catalog: LocalCatalog, tmp_path: Path, clock: Clock
) -> None:
    config, layer = digest("config"), digest("layer")
    image, data, parsed = manifest(config, layer)
    top, top_data, top_parsed = manifest(image, index=True)
    await catalog.add_blob(layer, 100)
    await catalog.add_manifest(U, R, image, len(data), parsed, proved=clock())
    await catalog.add_manifest(U, R, top, len(top_data), top_parsed, proved=clock())
    await catalog.set_tag(U, R, "1", top, clock())
    await catalog.prove(U, R, layer, clock() - 10)

    async def answers(c: LocalCatalog) -> tuple[object, ...]:
        tag = await c.tag(U, R, "1")
        info = await c.manifest(image)
        return (
            tag.digest if tag else None,
            info.size if info else None,
            await c.has_image(U, R, top),
            await c.has_image(U, "library/other", top),
            await c.proof(U, R, layer),
            await c.proof(U, "library/other", layer),
            await c.parents(U, R, image),
        )

    expected = (top, len(data), True, False, clock() - 10, None, [top])
    assert await answers(catalog) == expected
    assert await catalog.flush()
    await catalog.close()
    again = await reopened(tmp_path, clock)
    try:
        assert await answers(again) == expected
        assert again.total_bytes == 100 + len(data) + len(top_data)
    finally:
        await again.close()


# --- another process's commits -------------------------------------------------------------------
MOVED = str(digest("moved"))
OtherOps = Callable[[str, str], list[Op]]  # (image, layer) -> what another process writes


@pytest.mark.parametrize(
    ("ops", "lookup", "expected"),
    [
        # a row we never had in memory: the miss asks the database at once
        (lambda image, layer: [SetTag(U, R, "new", MOVED, 5.0)], ("tag", "new"), MOVED),
        # rows we had: changed elsewhere, seen after the background sync reloads
        (lambda image, layer: [SetTag(U, R, "1", MOVED, 5.0)], ("tag", "1"), MOVED),
        (lambda image, layer: [DropImage(U, R, image)], ("tag", "1"), None),
        (lambda image, layer: [Prove(U, "library/else", layer, 7.0)], ("proof", "library/else"), 7.0),
        (lambda image, layer: [Forget((layer,))], ("proof", R), None),
    ],
)
async def test_another_process_commits_are_seen(
    catalog: LocalCatalog, other: CatalogDatabase, clock: Clock, ops: OtherOps, lookup: tuple[str, str],
    expected: object,
) -> None:  # fmt: skip
    layer = digest("layer")
    image, data, parsed = manifest(digest("config"), layer)
    await catalog.add_manifest(U, R, image, len(data), parsed, proved=clock())
    await catalog.set_tag(U, R, "1", image, clock())
    await catalog.prove(U, R, layer, clock())
    assert await catalog.flush()
    assert await catalog.proof(U, "library/else", layer) is None  # memoized: nobody else holds it
    other.write(ops(str(image), str(layer)))

    async def seen() -> bool:
        kind, key = lookup
        if kind == "tag":
            entry = await catalog.tag(U, R, key)
            return (str(entry.digest) if entry else None) == expected
        return await catalog.proof(U, key, layer) == expected

    await eventually(seen, timeout=5)


# --- a write lock held by another process -----------------------------------------------------------
@pytest.mark.parametrize(("held", "expected_error"), [(0.1, None), (1.5, CatalogLocked)])
async def test_a_held_write_lock_delays_writes_only(
    catalog: LocalCatalog, other: CatalogDatabase, clock: Clock, held: float,
    expected_error: type[Exception] | None,
) -> None:  # fmt: skip
    known, _, known_parsed = manifest(digest("c0"), digest("l0"))
    await catalog.add_manifest(U, R, known, 10, known_parsed, proved=clock())
    await catalog.set_tag(U, R, "known", known, clock())
    assert await catalog.flush()
    other.db.execute("BEGIN IMMEDIATE")  # what `cache prune` holds while it deletes
    asyncio.get_running_loop().call_later(held, lambda: other.db.execute("COMMIT"))
    started = time.perf_counter()
    assert await catalog.tag(U, R, "known") is not None  # memory
    assert await catalog.tag(U, R, "absent") is None  # the reader: WAL readers never wait
    assert time.perf_counter() - started < 0.25
    image, data, parsed = manifest(digest("c1"), digest("l1"))
    if expected_error is None:
        await catalog.add_manifest(U, R, image, len(data), parsed, proved=clock())
    else:
        with pytest.raises(expected_error) as raised:
            await catalog.add_manifest(U, R, image, len(data), parsed, proved=clock())
        error = raised.value
        assert (error.status, error.code, error.headers) == (503, "UNAVAILABLE", {"Retry-After": "1"})
        assert await catalog.flush() is False
    assert await catalog.manifest(image) is not None  # answered from memory meanwhile
    await eventually(lambda: not other.db.in_transaction, timeout=5)
    # Nothing was lost: the queued write commits once the lock clears.
    await eventually(lambda: other.manifest(str(image)) is not None, timeout=5)
    assert await catalog.flush()


async def test_unavailable_database(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    path.write_bytes(b"this is not a database" * 100)
    catalog = LocalCatalog(path)
    with pytest.raises(CatalogUnavailable, match="not a database"):
        await catalog.open()
    await catalog.close()


# --- proofs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("prove", 10.0)], 10.0),
        ([("prove", 10.0), ("prove", 5.0)], 10.0),  # a proof only gets younger
        ([("prove", 10.0), ("disprove", None)], None),
        ([("disprove", None), ("prove", 3.0)], 3.0),
        ([("prove", PINNED), ("prove", 20.0)], PINNED),  # an import's pin stays
    ],
)
async def test_proof_history(
    catalog: LocalCatalog, tmp_path: Path, clock: Clock, steps: list[tuple[str, float | None]],
    expected: float | None,
) -> None:  # fmt: skip
    layer = digest("layer")
    for step, when in steps:
        if step == "prove":
            assert when is not None
            await catalog.prove(U, R, layer, when)
        else:
            await catalog.disprove(U, R, layer)
    assert await catalog.proof(U, R, layer) == expected  # before the commit
    assert await catalog.flush()
    assert await catalog.proof(U, R, layer) == expected  # after it
    await catalog.close()
    again = await reopened(tmp_path, clock)
    try:
        assert await again.proof(U, R, layer) == expected
    finally:
        await again.close()


# --- pull statistics -----------------------------------------------------------------------------------
async def test_pulls_are_counted_by_touch_and_never_pulled_shows_no_time(
    catalog: LocalCatalog, other: CatalogDatabase, clock: Clock
) -> None:
    pulled, data, parsed = manifest(digest("c1"), digest("l1"))
    idle, idle_data, idle_parsed = manifest(digest("c2"), digest("l2"))
    await catalog.add_manifest(U, R, pulled, len(data), parsed, proved=clock())
    await catalog.add_manifest(U, R, idle, len(idle_data), idle_parsed, proved=clock())
    for _ in range(3):
        clock.advance(60)
        catalog.touch(U, R, pulled)
    # Written within about a second with no flush (``cache ls`` in another process sees it).
    await eventually(lambda: {r[2]: r[3:] for r in other.inventory().images}.get(str(pulled)) == (clock(), 3), 3)
    assert {r[2]: r[3:] for r in other.inventory().images}[str(idle)] == (0.0, 0)


# --- maintenance -----------------------------------------------------------------------------------------
async def test_snapshot_commits_queued_writes_first(catalog: LocalCatalog, clock: Clock) -> None:
    layer = digest("layer")
    image, data, parsed = manifest(digest("config"), layer)
    await catalog.add_blob(layer, 5)
    await catalog.add_manifest(U, R, image, len(data), parsed, proved=clock())
    snapshot = await catalog.snapshot()
    assert (str(image), str(layer)) in snapshot.refs and snapshot.sizes[str(layer)] == 5
    assert snapshot.manifests == {str(image)}


async def test_reconcile_and_forget(catalog: LocalCatalog, other: CatalogDatabase, clock: Clock) -> None:
    kept, gone, stray = digest("kept"), digest("gone"), digest("stray")
    image, data, parsed = manifest(kept, gone)
    await catalog.add_blob(kept, 1)
    await catalog.add_blob(gone, 2)
    await catalog.add_manifest(U, R, image, len(data), parsed, proved=clock())
    await catalog.set_tag(U, R, "1", image, clock())
    assert await catalog.flush()
    # `gone` and the manifest's file vanished (a crash); `stray` has a file and no row.
    assert await catalog.reconcile([(kept, 1), (stray, 3)]) == 2
    assert await catalog.tag(U, R, "1") is None and await catalog.manifest(image) is None
    assert await catalog.totals() == (4, 2)
    await catalog.forget([kept])
    assert await catalog.flush()
    assert other.totals() == (3, 1)


# --- schema migration --------------------------------------------------------------------------------
V1_SCHEMA = """
CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,
    is_manifest INTEGER NOT NULL DEFAULT 0, added REAL NOT NULL);
CREATE TABLE images (upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    last_pulled REAL NOT NULL, pull_count INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (upstream, repository, digest));
CREATE TABLE refs (parent TEXT NOT NULL, child TEXT NOT NULL, PRIMARY KEY (parent, child));
CREATE TABLE tags (upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, checked REAL NOT NULL, PRIMARY KEY (upstream, repository, tag));
CREATE TABLE repo_blobs (upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest));
INSERT INTO blobs VALUES ('sha256:m', 10, 'x', 1, 100), ('sha256:l', 20, NULL, 0, 100), ('sha256:i', 5, 'x', 1, 100),
    ('sha256:il', 7, NULL, 0, 100);
INSERT INTO images VALUES ('docker.io', 'library/app', 'sha256:m', 500, 2),
    ('docker.io', 'library/imp', 'sha256:i', 100, 0);
INSERT INTO refs VALUES ('sha256:m', 'sha256:l'), ('sha256:i', 'sha256:il');
INSERT INTO tags VALUES ('docker.io', 'library/imp', '1', 'sha256:i', 253402300799.0);
INSERT INTO repo_blobs VALUES ('docker.io', 'library/other', 'sha256:l');
"""


def test_a_version_1_catalog_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    legacy = sqlite3.connect(path)
    legacy.executescript(V1_SCHEMA)
    legacy.close()
    database = CatalogDatabase(path).open()
    try:
        proofs = {(r, d): database.proofs(d).get((U, r)) for r in ("library/app", "library/imp", "library/other")
                  for d in ("sha256:m", "sha256:l", "sha256:i", "sha256:il")}  # fmt: skip
        assert {k: v for k, v in proofs.items() if v is not None} == {
            ("library/app", "sha256:m"): 0.0,  # its own manifest: re-checked on first use
            ("library/other", "sha256:l"): 0.0,  # an upstream confirmation: re-checked too
            ("library/imp", "sha256:i"): PINNED,  # an import (pinned tag) and what it references
            ("library/imp", "sha256:il"): PINNED,
        }  # a blob a manifest merely references proves nothing: library/app has no proof for sha256:l
        images = {r[1]: r[3:] for r in database.inventory().images}
        assert images == {"library/app": (500.0, 2), "library/imp": (0.0, 0)}  # never pulled: no time
    finally:
        database.close()
    again = CatalogDatabase(path).open()  # idempotent
    again.write([AddManifest(U, R, "sha256:n", 1, "x", (), 1.0)])
    again.close()
