"""End to end: real clients (skopeo, containerd) pull real images through the mirror from
real upstream registries (Debian's docker-registry), and a second pull is served from the
cache — counted in the upstream's own access log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.http.app import create_app
from tests.support import skopeo
from tests.support.aio import ServerFactory
from tests.support.containerd import Containerd
from tests.support.images import ImageFactory, OciLayout, assert_layout_matches
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

BLOBS = r"/blobs/sha256:[0-9a-f]{64}$"


def upstream_config(tmp_path: Path, *upstreams: UpstreamConfig) -> Config:
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=upstreams,
        default_upstream=upstreams[0].name,
        timeouts=TimeoutConfig(connect=5, read=30, manifest=10, retries=1, backoff=0.05),
    )


@pytest.fixture
def second_registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "second") as upstream:
        yield upstream


@pytest.fixture
async def mirror_url(registry: Registry, aiohttp_server: ServerFactory, tmp_path: Path) -> AsyncIterator[str]:
    server = await aiohttp_server(create_app(upstream_config(tmp_path, UpstreamConfig("docker.io", registry.url))))
    yield f"http://{server.host}:{server.port}"


async def test_skopeo_pulls_multi_layer_image_then_from_cache(
    registry: Registry, mirror_url: str, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    image = image_factory.image("1.0", layers=[300_000, 70_000, 5_000])
    await registry.apush(image.layout, image.tag, f"{repo}:1.0")
    since = await registry.amark()
    host = mirror_url.removeprefix("http://")
    await skopeo.acopy(f"docker://{host}/{repo}:1.0", f"oci:{tmp_path / 'first'}:x")
    assert_layout_matches(tmp_path / "first", image)
    first = await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since)
    assert first == len(image.blob_digests)
    # Second client: everything from the cache, not one blob GET upstream.
    await skopeo.acopy(f"docker://{host}/{repo}:1.0", f"oci:{tmp_path / 'second'}:x")
    assert_layout_matches(tmp_path / "second", image)
    assert await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since) == first


async def test_containerd_pulls_multi_arch_index_then_from_cache(
    containerd: Containerd, registry: Registry, mirror_url: str, image_factory: ImageFactory, repo: str
) -> None:
    index = image_factory.index("1", layers=[250_000, 4_000])
    await registry.apush(index.layout, index.tag, f"{repo}:1")
    since = await registry.amark()
    source = OciLayout(index.layout)
    for platform in ("linux/amd64", "linux/arm64"):
        namespace = containerd.new_namespace()
        digest = await containerd.apull(f"docker.io/{repo}:1", mirror_url, platform=platform, namespace=namespace)
        assert digest == index.index_digest
        image = index.images[platform]
        assert containerd.content_digests(namespace=namespace) == {index.index_digest, *image.all_digests}
        for blob in image.all_digests:
            assert containerd.content_get(blob, namespace=namespace) == source.blob_path(blob).read_bytes()
    fetched = await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since)
    assert fetched == sum(len(index.images[p].blob_digests) for p in ("linux/amd64", "linux/arm64"))
    # A fresh containerd namespace downloads everything again: all of it from the mirror.
    await containerd.apull(f"docker.io/{repo}:1", mirror_url, namespace=containerd.new_namespace())
    assert await registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", since=since) == fetched


async def test_two_upstreams_routed_by_ns_and_by_path_prefix(
    containerd: Containerd,
    registry: Registry,
    second_registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    config = upstream_config(
        tmp_path, UpstreamConfig("docker.io", registry.url), UpstreamConfig("ghcr.io", second_registry.url)
    )
    server = await aiohttp_server(create_app(config))
    mirror_url = f"http://{server.host}:{server.port}"
    hub_image = image_factory.image("1", layers=[20_000])
    ghcr_image = image_factory.image("1", layers=[30_000])
    await registry.apush(hub_image.layout, "1", "library/shared-name:1")
    await second_registry.apush(ghcr_image.layout, "1", "owner/app:1")
    # containerd: hosts.toml for ghcr.io names the mirror; requests carry ?ns=ghcr.io.
    digest = await containerd.apull("ghcr.io/owner/app:1", mirror_url, namespace=containerd.new_namespace())
    assert digest == ghcr_image.manifest_digest
    digest = await containerd.apull("docker.io/library/shared-name:1", mirror_url, namespace=containerd.new_namespace())
    assert digest == hub_image.manifest_digest
    # skopeo (no ns): the upstream is named by a path prefix.
    host = mirror_url.removeprefix("http://")
    await skopeo.acopy(f"docker://{host}/ghcr.io/owner/app:1", f"oci:{tmp_path / 'ghcr'}:x")
    assert_layout_matches(tmp_path / "ghcr", ghcr_image)
    assert await second_registry.acount_requests("GET", rf"^/v2/owner/app{BLOBS}") == len(ghcr_image.blob_digests)
    assert await registry.acount_requests("GET", r"^/v2/owner/app/") == 0


async def test_token_auth_upstream(
    auth_registry: Registry,
    token_server: TokenServer,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, password = token_server.creds
    monkeypatch.setenv("PULLGATE_TEST_UPSTREAM_PASSWORD", password)
    image = image_factory.image("2", layers=[40_000, 1_000])
    await auth_registry.apush(image.layout, "2", f"{repo}:2")
    upstream = UpstreamConfig(
        "docker.io", auth_registry.url, username=user, password_env="PULLGATE_TEST_UPSTREAM_PASSWORD"
    )
    server = await aiohttp_server(create_app(upstream_config(tmp_path, upstream)))
    before = token_server.request_count
    # The client has no credentials for the upstream: the mirror does the token flow.
    await skopeo.acopy(f"docker://{server.host}:{server.port}/{repo}:2", f"oci:{tmp_path / 'out'}:x")
    assert_layout_matches(tmp_path / "out", image)
    assert token_server.request_count - before == 1, "one token for the repository scope, then cached"
    assert await auth_registry.acount_requests("GET", rf"^/v2/{repo}{BLOBS}", status=200) == len(image.blob_digests)
