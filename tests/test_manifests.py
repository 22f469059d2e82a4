"""Manifests through the cache (``ManifestCache``) against a registry-shaped upstream
(``Origin``), with an injected clock: a tag's life (hit, revalidated, moved, stale, too
stale), remembered 404s, digests stored for another repository, one upstream request for
concurrent misses, lying upstreams, pull counting, and a catalog locked by another process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from proxy.config.settings import CacheConfig
from proxy.errors import CatalogLocked, DigestMismatch, ManifestUnknown, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.registry.catalog import CatalogDatabase
from tests.support.cacheparts import Parts, cache_parts
from tests.support.origin import OCI_INDEX, OCI_MANIFEST, Image, Origin
from tests.support.polling import eventually

TTL, STALE, NEGATIVE = 300.0, 3600.0, 30.0
APP, OTHER = "library/app", "library/other"


@pytest.fixture
async def parts(origin: tuple[Origin, TestServer], tmp_path: Path) -> AsyncIterator[Parts]:
    _, server = origin
    cache = CacheConfig(dir=tmp_path / "cache", tag_ttl=TTL, max_stale=STALE, negative_ttl=NEGATIVE)
    async with cache_parts(tmp_path / "cache", str(server.make_url("")).rstrip("/"), cache=cache) as built:
        yield built


@pytest.fixture
def image(origin: tuple[Origin, TestServer]) -> Image:
    return origin[0].add_image(APP, "1")


def upstream_requests(origin: Origin) -> tuple[int, int]:
    return origin.count("HEAD", "/manifests/"), origin.count("GET", "/manifests/")


@pytest.mark.parametrize(
    ("advance", "change", "expected", "requests"),
    [
        (TTL - 1, None, "hit", (0, 0)),  # within tag_ttl: memory only
        (TTL + 1, None, "revalidated", (1, 0)),  # a HEAD (free on Docker Hub), same digest
        (TTL + 1, "moved", "miss", (1, 1)),  # the tag moved: the new manifest is fetched
        (TTL + 1, "down", "stale", (1, 0)),  # upstream down: served stale within max_stale
        (TTL + STALE + 1, "down", UpstreamUnavailable, (1, 0)),  # too stale: the error
    ],
)
async def test_a_tags_life(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image, advance: float, change: str | None,
    expected: str | type[Exception], requests: tuple[int, int],
) -> None:  # fmt: skip
    upstream = origin[0]
    first = await parts.manifests.get(parts.route(APP), "1")
    assert (first.result, str(first.digest), first.data) == ("miss", image.digest, image.manifest)
    before = upstream_requests(upstream)
    parts.clock.advance(advance)
    moved = upstream.add_image(APP, "1") if change == "moved" else None
    upstream.status = 503 if change == "down" else None
    if isinstance(expected, str):
        found = await parts.manifests.get(parts.route(APP), "1")
        assert found.result == expected
        assert str(found.digest) == (moved.digest if moved else image.digest)
    else:
        with pytest.raises(expected):
            await parts.manifests.get(parts.route(APP), "1")
    after = upstream_requests(upstream)
    assert (after[0] - before[0], after[1] - before[1]) == requests


async def test_an_unknown_tag_is_remembered_for_negative_ttl(parts: Parts, origin: tuple[Origin, TestServer]) -> None:
    upstream = origin[0]
    for _ in range(3):
        with pytest.raises(ManifestUnknown):
            await parts.manifests.get(parts.route(APP), "nope")
    assert upstream_requests(upstream) == (0, 1)
    parts.clock.advance(NEGATIVE + 1)
    upstream.add_image(APP, "nope")
    assert (await parts.manifests.get(parts.route(APP), "nope")).result == "miss"


@pytest.mark.parametrize(
    ("other_holds", "expected_error"),
    [(True, None), (False, ManifestUnknown)],
)
async def test_a_digest_stored_for_another_repository_needs_the_upstreams_word(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image, other_holds: bool,
    expected_error: type[Exception] | None,
) -> None:  # fmt: skip
    upstream = origin[0]
    await parts.manifests.get(parts.route(APP), "1")
    if other_holds:
        upstream.put_manifest(OTHER, None, OCI_MANIFEST, image.manifest)
    digest = Digest.parse(image.digest)
    for _ in range(2):
        if expected_error is None:
            assert (await parts.manifests.get(parts.route(OTHER), image.digest)).result == "hit"
        else:
            with pytest.raises(expected_error):
                await parts.manifests.get(parts.route(OTHER), image.digest)
    assert upstream.count("HEAD", f"/{OTHER}/manifests/") == (1 if other_holds else 2)
    assert upstream.count("GET", f"/{OTHER}/manifests/") == 0, "the bytes came from the store"
    assert await parts.catalog.has_image("docker.io", OTHER, digest) is other_holds


async def test_an_index_naming_another_repositorys_manifest_does_not_make_it_servable(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image
) -> None:
    upstream = origin[0]
    await parts.manifests.get(parts.route(APP), "1")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest),
                            "platform": {"os": "linux", "architecture": "amd64"}}]}  # fmt: skip
    upstream.put_manifest(OTHER, "leak", OCI_INDEX, json.dumps(index).encode())
    await parts.manifests.get(parts.route(OTHER), "leak")  # prefetches the platform manifest: refused
    await eventually(lambda: upstream.count("HEAD", f"/{OTHER}/manifests/{image.digest}") == 1)
    with pytest.raises(ManifestUnknown):
        await parts.manifests.get(parts.route(OTHER), image.digest)
    assert not await parts.catalog.has_image("docker.io", OTHER, Digest.parse(image.digest))


@pytest.mark.parametrize(
    ("reference", "repository", "before", "after", "evict", "answered"),
    [
        ("tag", APP, 0.0, 0.5, False, True),  # what get answered from memory, without awaiting
        ("digest", APP, 0.0, 0.5, False, True),
        ("tag", APP, 0.0, 1.5, False, False),  # reused for at most a second: then get looks again
        ("digest", APP, 0.0, 1.5, False, False),
        ("tag", APP, TTL - 0.5, 0.6, False, False),  # never past the tag's tag_ttl
        ("tag", APP, 0.0, 0.0, True, False),  # evicted: forgotten
        ("digest", APP, 0.0, 0.0, True, False),
        ("tag", OTHER, 0.0, 0.0, False, False),  # another repository's tag of the same name
    ],
)
async def test_peek_answers_only_what_get_just_answered_from_memory(
    parts: Parts, image: Image, reference: str, repository: str, before: float, after: float, evict: bool,
    answered: bool,
) -> None:  # fmt: skip
    ref = "1" if reference == "tag" else image.digest
    assert parts.manifests.peek(parts.route(APP), ref) is None
    assert (await parts.manifests.get(parts.route(APP), "1")).result == "miss"
    assert parts.manifests.peek(parts.route(APP), ref) is None, "only the fast path's answers are kept"
    parts.clock.advance(before)
    hit = await parts.manifests.get(parts.route(APP), ref)
    assert hit.result == "hit"
    parts.clock.advance(after)
    if evict:
        parts.manifests.forget(hit.digest)
    hits = {"kind": "manifest", "result": "hit"}
    before_hits = parts.metrics.registry.get_sample_value("pullgate_cache_requests_total", hits) or 0
    found = parts.manifests.peek(parts.route(repository), ref)
    assert found == (hit if answered else None)
    assert parts.metrics.registry.get_sample_value("pullgate_cache_requests_total", hits) == before_hits + answered


async def test_concurrent_misses_share_one_upstream_request(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image
) -> None:
    found = await asyncio.gather(*(parts.manifests.get(parts.route(APP), "1") for _ in range(8)))
    assert {str(m.digest) for m in found} == {image.digest}
    assert upstream_requests(origin[0]) == (0, 1)


async def test_a_manifest_that_does_not_match_its_digest_is_refused(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image
) -> None:
    origin[0].lie_about_digest = True
    with pytest.raises(DigestMismatch):
        await parts.manifests.get(parts.route(APP), "1")
    assert parts.store.size(Digest.parse(image.digest)) is None
    assert await parts.catalog.tag("docker.io", APP, "1") is None


async def test_only_pulled_counts_a_pull(parts: Parts, image: Image) -> None:
    route = parts.route(APP)
    found = await parts.manifests.get(route, "1")  # a HEAD or an admission lookup
    await parts.manifests.get(route, image.digest, count=False)  # the mirror's own read
    parts.manifests.pulled(route, found.digest)  # a client's GET
    assert await parts.catalog.flush()
    database = CatalogDatabase(parts.root / "catalog.db").open()
    try:
        assert [r[3:] for r in database.inventory().images] == [(parts.clock(), 1)]
    finally:
        database.close()


async def test_a_new_manifest_while_another_process_holds_the_catalog(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image
) -> None:
    other = CatalogDatabase(parts.root / "catalog.db").open()
    other.db.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CatalogLocked):  # after lock_wait (1 s here): a 503 with Retry-After
            await parts.manifests.get(parts.route(APP), "1")
    finally:
        other.db.execute("COMMIT")
        other.close()
    found = await parts.manifests.get(parts.route(APP), "1")  # retried once the lock clears
    assert str(found.digest) == image.digest
    assert await parts.catalog.flush()
