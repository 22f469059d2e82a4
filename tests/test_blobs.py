"""Blobs through the cache (``BlobService``) against a registry-shaped upstream (``Origin``):
which repository may be served a stored blob (a proof that the upstream showed the
repository holds it — never a manifest that merely references it), how long a proof lasts
(injected clock), single flight, and bytes that do not match their digest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from proxy.errors import BlobUnknown, DigestMismatch, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.registry.blobs import CachedBlob
from proxy.registry.download import Flight
from tests.support.cacheparts import Parts, cache_parts
from tests.support.images import sha256_digest
from tests.support.origin import OCI_MANIFEST, Image, Origin
from tests.support.polling import eventually

TTL = 3600.0
APP, OTHER, LEAK = "library/app", "library/other", "attacker/leak"


@pytest.fixture
async def parts(origin: tuple[Origin, TestServer], tmp_path: Path) -> AsyncIterator[Parts]:
    _, server = origin
    async with cache_parts(tmp_path / "cache", str(server.make_url("")).rstrip("/"), proof_ttl=TTL) as built:
        yield built


@pytest.fixture
def image(origin: tuple[Origin, TestServer]) -> Image:
    return origin[0].add_image(APP, "1", layers=[50_000])


async def fetch(parts: Parts, repository: str, digest: str) -> bytes:
    found = await parts.blobs.get(parts.route(repository), Digest.parse(digest))
    if isinstance(found, CachedBlob):
        data = await parts.store.read(found.digest)
        assert data is not None
        return data
    return b"".join([chunk async for chunk in found.read()])


async def head(parts: Parts, repository: str, digest: str) -> int | None:
    return (await parts.blobs.head(parts.route(repository), Digest.parse(digest))).size


def leak_manifest(origin: Origin, target: str) -> None:
    """An attacker's manifest in a public repository naming someone else's digest."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": target, "size": 1},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": target, "size": 1,
                       "urls": ["https://example.invalid/x"]}]}  # fmt: skip
    origin.put_manifest(LEAK, "latest", OCI_MANIFEST, json.dumps(doc).encode())


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    ("repository", "upstream_holds", "expected_error", "heads"),
    [
        (APP, True, None, 0),  # fetched from this very repository: its proof
        (OTHER, True, None, 1),  # the upstream confirms once, then it is remembered
        (OTHER, False, BlobUnknown, 2),  # the upstream says no: asked again next time, never served
        (LEAK, False, BlobUnknown, 2),  # a manifest of the repository references it: proves nothing
    ],
)
async def test_a_stored_blob_is_served_only_where_the_upstream_showed_it(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image, method: str, repository: str,
    upstream_holds: bool, expected_error: type[Exception] | None, heads: int,
) -> None:  # fmt: skip
    upstream = origin[0]
    layer = sha256_digest(image.layers[0])
    assert await fetch(parts, APP, layer) == image.layers[0]  # cached for APP
    if upstream_holds and repository != APP:
        upstream.blobs[(repository, layer)] = image.layers[0]
    leak_manifest(upstream, layer)
    await parts.manifests.get(parts.route(LEAK), "latest")  # the reference is cached too
    before = upstream.count("HEAD", f"/{repository}/blobs/")
    for _ in range(2):
        if expected_error is not None:
            with pytest.raises(expected_error):
                await (fetch(parts, repository, layer) if method == "GET" else head(parts, repository, layer))
        elif method == "GET":
            assert await fetch(parts, repository, layer) == image.layers[0]
        else:
            assert await head(parts, repository, layer) == len(image.layers[0])
    assert upstream.count("HEAD", f"/{repository}/blobs/") - before == heads
    assert upstream.count("GET", f"/{repository}/blobs/") == (1 if repository == APP else 0)


@pytest.mark.parametrize(
    ("later", "expected_error", "proof_kept"),
    [
        ("holds", None, True),  # asked again after the TTL: still there, proof renewed
        ("gone", BlobUnknown, False),  # removed upstream: not served, proof dropped
        ("down", None, True),  # the upstream cannot be reached: the old proof still serves
    ],
)
async def test_a_proof_is_asked_again_after_its_ttl(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image, later: str,
    expected_error: type[Exception] | None, proof_kept: bool,
) -> None:  # fmt: skip
    upstream = origin[0]
    layer = sha256_digest(image.layers[0])
    upstream.blobs[(OTHER, layer)] = image.layers[0]
    await fetch(parts, APP, layer)
    await fetch(parts, OTHER, layer)  # proven by a HEAD
    parts.clock.advance(TTL - 1)
    before = upstream.count("HEAD", f"/{OTHER}/blobs/")
    await fetch(parts, OTHER, layer)
    assert upstream.count("HEAD", f"/{OTHER}/blobs/") == before, "a fresh proof needs no upstream"
    parts.clock.advance(2)
    if later == "gone":
        del upstream.blobs[(OTHER, layer)]
    elif later == "down":
        upstream.status = 503
    if expected_error is not None:
        with pytest.raises(expected_error):
            await fetch(parts, OTHER, layer)
    else:
        assert await fetch(parts, OTHER, layer) == image.layers[0]
    assert upstream.count("HEAD", f"/{OTHER}/blobs/") > before
    proof = await parts.catalog.proof("docker.io", OTHER, Digest.parse(layer))
    assert (proof is not None) == proof_kept
    if later == "holds":
        assert proof == parts.clock()


async def test_without_any_proof_an_unreachable_upstream_is_an_error(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image
) -> None:
    layer = sha256_digest(image.layers[0])
    await fetch(parts, APP, layer)
    origin[0].status = 503
    with pytest.raises(UpstreamUnavailable):
        await fetch(parts, OTHER, layer)


@pytest.mark.parametrize(
    ("joiner", "heads", "expected_error"),
    [
        (APP, 0, None),  # the download is this repository's own GET
        (OTHER, 1, None),  # another repository that the upstream says holds it
        (LEAK, 1, BlobUnknown),  # one that does not: never joins someone else's download
    ],
)
async def test_clients_join_one_download(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image, joiner: str, heads: int,
    expected_error: type[Exception] | None,
) -> None:  # fmt: skip
    upstream = origin[0]
    layer = sha256_digest(image.layers[0])
    upstream.blobs[(OTHER, layer)] = image.layers[0]
    upstream.chunk_delay = 0.05  # a download long enough to join
    first = await parts.blobs.get(parts.route(APP), Digest.parse(layer))
    assert isinstance(first, Flight)
    if expected_error is not None:
        for attempt in (parts.blobs.get, parts.blobs.head):
            with pytest.raises(expected_error):
                await attempt(parts.route(joiner), Digest.parse(layer))
        assert await fetch(parts, APP, layer) == image.layers[0]
    else:
        second = await parts.blobs.get(parts.route(joiner), Digest.parse(layer))
        assert second is first
        results = await asyncio.gather(fetch(parts, APP, layer), fetch(parts, joiner, layer))
        assert results == [image.layers[0]] * 2
    assert upstream.count("GET", "/blobs/") == 1
    assert upstream.count("HEAD", f"/{joiner}/blobs/") == heads * (2 if expected_error else 1)


async def test_bytes_that_do_not_match_their_digest_are_neither_served_whole_nor_kept(
    parts: Parts, origin: tuple[Origin, TestServer], image: Image
) -> None:
    layer = sha256_digest(image.layers[0])
    origin[0].corrupt.add(layer)
    with pytest.raises(DigestMismatch):
        await fetch(parts, APP, layer)
    assert parts.store.size(Digest.parse(layer)) is None
    assert await parts.catalog.proof("docker.io", APP, Digest.parse(layer)) is None
    await eventually(lambda: list(parts.store.tmp.iterdir()) == [])  # the temp file goes just after
