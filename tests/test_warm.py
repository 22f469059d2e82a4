"""``warm`` against the real registry: every platform of an index (or the ones asked for) is
cached through the mirror's own code, verified, counted in the upstream's access log; a
second warm downloads nothing; failures are reported per image; the image lists come from
files and Kubernetes manifests."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.inventory.warm import Warmer, open_mirror, read_list
from proxy.oci.digest import Digest
from proxy.ops.progress import Progress
from proxy.registry.mirror import Mirror
from tests.support.images import ImageFactory, IndexInfo
from tests.support.registry import Registry

BLOBS = r"/blobs/sha256:[0-9a-f]{64}$"


def warm_config(cache: Path, upstream_url: str) -> Config:
    return Config(
        cache=CacheConfig(dir=cache),
        upstreams=(UpstreamConfig("docker.io", upstream_url),),
        timeouts=TimeoutConfig(connect=2, read=30, manifest=10, retries=0, backoff=0.05),
    )


@pytest.fixture
async def mirror(registry: Registry, tmp_path: Path) -> AsyncIterator[Mirror]:
    opened = await open_mirror(warm_config(tmp_path / "cache", registry.url))
    yield opened
    await opened.close()


def warmer(mirror: Mirror, log: io.StringIO, **options: object) -> Warmer:
    return Warmer(mirror, Progress(log, tty=False), **options)  # type: ignore[arg-type]


def cached(mirror: Mirror, digests: tuple[str, ...]) -> set[str]:
    return {d for d in digests if mirror.store.size(Digest.parse(d)) is not None}


@pytest.fixture
async def index(registry: Registry, image_factory: ImageFactory, repo: str) -> IndexInfo:
    built = image_factory.index("1", platforms=("linux/amd64", "linux/arm64", "linux/arm/v7"), layers=[200_000, 3_000])
    await registry.apush(built.layout, built.tag, f"{repo}:1")
    return built


async def test_warm_caches_every_platform_once(mirror: Mirror, registry: Registry, index: IndexInfo, repo: str) -> None:
    since = await registry.amark()
    log = io.StringIO()
    (result,) = await warmer(mirror, log).run([f"docker.io/{repo}:1"])
    assert result.error is None and result.digest == index.index_digest
    assert result.platforms == ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    assert cached(mirror, index.all_digests) == set(index.all_digests)
    blob_count = sum(len(i.blob_digests) for i in index.images.values())
    assert result.fetched == result.size > 600_000
    assert await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since) == blob_count
    assert f"docker.io/{repo}:1: done" in log.getvalue()
    # Second time: all from the cache, not one blob GET upstream.
    (again,) = await warmer(mirror, io.StringIO()).run([f"{repo}:1"])
    assert again.fetched == 0 and again.size == result.size
    assert await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since) == blob_count


async def test_warm_only_the_platforms_asked_for(mirror: Mirror, index: IndexInfo, repo: str) -> None:
    (result,) = await warmer(mirror, io.StringIO(), platforms=frozenset({"linux/arm64"})).run([f"{repo}:1"])
    assert result.error is None and result.platforms == ["linux/arm64"]
    arm = index.images["linux/arm64"]
    amd = index.images["linux/amd64"]
    assert cached(mirror, (index.index_digest, *arm.all_digests)) == {index.index_digest, *arm.all_digests}
    assert cached(mirror, amd.blob_digests) == set()


@pytest.mark.parametrize(
    ("reference", "options", "error"),
    [
        ("REPO:1", {}, None),
        ("REPO@DIGEST", {}, None),
        ("REPO:2", {}, "unknown upstream"),
        ("quay.io/x/y:1", {}, "not mirrored"),
        ("Bad Name", {}, "invalid"),
        ("REPO:1", {"platforms": frozenset({"windows/amd64"})}, "offers none of the platforms"),
    ],
)
async def test_warm_reports_each_image(
    mirror: Mirror, index: IndexInfo, repo: str, reference: str, options: dict[str, object], error: str | None
) -> None:
    reference = reference.replace("REPO", repo).replace("DIGEST", index.index_digest)
    log = io.StringIO()
    (result,) = await warmer(mirror, log, **options).run([reference])
    if error is None:
        assert result.error is None and result.digest == index.index_digest
        return
    assert result.error is not None and error in result.error
    assert f"{reference}: failed" in log.getvalue()


async def test_warm_many_at_once_with_shared_layers(
    mirror: Mirror, registry: Registry, image_factory: ImageFactory, repo: str
) -> None:
    images = [image_factory.image(str(i), layers=[100_000, 5_000], seed="shared-base") for i in range(4)]
    for i, image in enumerate(images):
        await registry.apush(image.layout, image.tag, f"{repo}-{i}:1")
    since = await registry.amark()
    results = await warmer(mirror, io.StringIO(), jobs=4).run([f"{repo}-{i}:1" for i in range(4)])
    assert [r.error for r in results] == [None] * 4
    assert all(cached(mirror, image.all_digests) == set(image.all_digests) for image in images)
    # Same seed: the same three blobs in four repositories, each downloaded once.
    assert await registry.acount_requests("GET", rf"^/v2/{repo}-\d{BLOBS}", since=since) == 3


async def test_warm_with_signatures(
    mirror: Mirror, registry: Registry, image_factory: ImageFactory, index: IndexInfo, repo: str
) -> None:
    signature = image_factory.image("sig", layers=[{"payload.json": b'{"critical":{}}'}])
    sig_tag = index.index_digest.replace(":", "-") + ".sig"
    await registry.apush(signature.layout, "sig", f"{repo}:{sig_tag}")
    (result,) = await warmer(mirror, io.StringIO(), signatures=True).run([f"{repo}:1"])
    assert result.error is None and result.attachments == [sig_tag]
    assert cached(mirror, signature.all_digests) == set(signature.all_digests)


async def test_a_second_process_leaves_the_daemons_downloads_alone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "tmp").mkdir(parents=True)
    # Our parent process is alive: it stands in for the daemon writing a download.
    download = cache / "tmp" / f"{os.getppid()}-in-progress.part"
    download.write_bytes(b"partial")
    crashed = cache / "tmp" / "2147483646-left-by-a-crash.part"  # no such process
    crashed.write_bytes(b"stale")
    opened = await open_mirror(warm_config(cache, "http://127.0.0.1:9"))
    await opened.close()
    assert download.read_bytes() == b"partial"
    assert not crashed.exists()


# --- image lists -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx:1.25\nredis:7\n", ["nginx:1.25", "redis:7"]),
        ("# base images\n\n  alpine:3.19   # pinned later\n", ["alpine:3.19"]),
        ("", []),
    ],
)
def test_read_list(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "images.txt"
    path.write_text(text)
    assert read_list(str(path)) == expected


