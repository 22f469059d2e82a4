"""The test infrastructure itself, against the real components and without the mirror:
images built here push with skopeo, pull back byte-identical, pull with containerd through
a hosts.toml mirror entry, and the token-auth registry demands our tokens."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import hangs, skopeo
from tests.support.containerd import Containerd, hosts_toml, registry_of
from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageFactory,
    ImageInfo,
    OciLayout,
    build_image,
)
from tests.support.procs import CommandError, http_status
from tests.support.registry import Registry, parse_access_line
from tests.support.tokenserver import TokenServer, parse_scope

BLOB_GET = r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$"


def pulled_layout(path: Path) -> tuple[OciLayout, dict[str, Any]]:
    layout = OciLayout(path)
    (entry,) = layout.manifests()
    return layout, entry


def assert_same_blobs(image: ImageInfo, copy: OciLayout) -> None:
    source = OciLayout(image.layout)
    for digest in image.all_digests:
        assert copy.blob_path(digest).read_bytes() == source.blob_path(digest).read_bytes()


# -- images ------------------------------------------------------------------------------
def test_layers_are_gzip_tars_with_matching_diff_ids(image_factory: ImageFactory) -> None:
    image = image_factory.image(layers=[5000, {"etc/motd": b"hello\n"}])
    layout = OciLayout(image.layout)
    config = json.loads(image.config_bytes)
    assert config["rootfs"]["diff_ids"] == list(image.diff_ids)
    for digest, diff_id, size in zip(image.layer_digests, image.diff_ids, image.layer_sizes, strict=True):
        blob = layout.blob_path(digest).read_bytes()
        assert len(blob) == size
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == diff_id
    manifest = json.loads(image.manifest_bytes)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["digest"] == image.config_digest


def test_seed_makes_content_reproducible(tmp_path: Path) -> None:
    first = build_image(tmp_path / "a", "one", seed=7)
    again = build_image(tmp_path / "b", "two", seed=7)
    fresh = build_image(tmp_path / "c", "one")
    assert first.manifest_digest == again.manifest_digest
    assert not set(first.layer_digests) & set(fresh.layer_digests)


@pytest.mark.parametrize(
    ("options", "path", "expected"),
    [
        ({"user": "1000:1000"}, ("config", "User"), "1000:1000"),
        ({"env": ["A=1"]}, ("config", "Env"), ["A=1"]),
        ({"labels": {"team": "sre"}}, ("config", "Labels"), {"team": "sre"}),
        ({"config_extra": {"WorkingDir": "/app"}}, ("config", "WorkingDir"), "/app"),
        ({"created": "2020-02-02T00:00:00Z"}, ("created",), "2020-02-02T00:00:00Z"),
        ({"platform": "linux/arm/v7"}, ("variant",), "v7"),
        ({"history": ["RUN make"], "layers": [10]}, ("history", 0, "created_by"), "RUN make"),
    ],
)
def test_config_options(
    image_factory: ImageFactory, options: dict[str, Any], path: tuple[str | int, ...], expected: object
) -> None:
    value: Any = json.loads(image_factory.image(**options).config_bytes)
    for key in path:
        value = value[key]
    assert value == expected


def test_index_has_one_image_per_platform(image_factory: ImageFactory) -> None:
    index = image_factory.index(platforms=["linux/amd64", "linux/arm64/v8"])
    body = json.loads(index.index_bytes)
    assert body["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in body["manifests"]] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    assert [m["digest"] for m in body["manifests"]] == [i.manifest_digest for i in index.images.values()]


# -- access log --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line_no", "method", "status", "agent", "query"),
    [
        (0, "GET", 401, "skopeo/1.9.3", ""),
        (2, "PATCH", 202, "skopeo/1.9.3", "_state="),
        (4, "HEAD", 401, "containerd/1.6.20~ds1", "ns=docker.io"),
        (6, "GET", 200, "containerd/1.6.20~ds1", "ns=docker.io"),
    ],
)
def test_parse_real_access_log_lines(
    data_dir: Path, line_no: int, method: str, status: int, agent: str, query: str
) -> None:
    line = (data_dir / "distribution-access.log").read_text().splitlines()[line_no]
    entry = parse_access_line(line)
    assert entry is not None
    assert (entry.method, entry.status, entry.user_agent) == (method, status, agent)
    assert entry.query.startswith(query)
    assert "?" not in entry.path


@pytest.mark.parametrize(
    ("method", "path_regex", "status", "expected"),
    [
        ("GET", BLOB_GET, None, 3),
        ("HEAD", r"/manifests/", None, 2),
        ("HEAD", r"/manifests/", 200, 1),
        (None, r"^/v2/", 401, 2),
        ("PUT", r"/manifests/v1$", 201, 1),
    ],
)
def test_count_requests_on_recorded_log(
    tmp_path: Path, data_dir: Path, method: str | None, path_regex: str, status: int | None, expected: int
) -> None:
    upstream = Registry(tmp_path)  # never started: only its log is read
    upstream.access_log_path.write_bytes((data_dir / "distribution-access.log").read_bytes())
    assert upstream.count_requests(method, path_regex, status=status) == expected


# -- registry + skopeo -------------------------------------------------------------------
def test_push_oci_image_and_pull_back(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    image = image_factory.image("v1", layers=[300_000, 1000, {"etc/os-release": b"ID=t\n"}])
    ref = registry.push(image.layout, image.tag, f"{repo}:v1")
    assert skopeo.inspect_raw(ref) == image.manifest_bytes
    skopeo.copy(ref, f"oci:{tmp_path / 'back'}:v1")
    layout, entry = pulled_layout(tmp_path / "back")
    assert (entry["digest"], entry["mediaType"]) == (image.manifest_digest, OCI_MANIFEST)
    assert_same_blobs(image, layout)


def test_push_docker_schema2_image_and_pull_back(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    # An oci: destination would make skopeo convert to OCI types; dir: keeps the bytes.
    image = image_factory.image("v1", layers=[2000, 1000], schema="docker")
    ref = registry.push(image.layout, image.tag, f"{repo}:v1")
    assert json.loads(image.manifest_bytes)["mediaType"] == DOCKER_MANIFEST
    assert skopeo.inspect_raw(ref) == image.manifest_bytes
    skopeo.copy(ref, f"dir:{tmp_path / 'back'}")
    assert (tmp_path / "back" / "manifest.json").read_bytes() == image.manifest_bytes
    source = OciLayout(image.layout)
    for digest in image.blob_digests:
        assert (tmp_path / "back" / digest.partition(":")[2]).read_bytes() == source.blob_path(digest).read_bytes()


def test_push_index_and_pull_back(registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path) -> None:
    index = image_factory.index("1", platforms=["linux/amd64", "linux/arm64"])
    ref = registry.push(index.layout, index.tag, f"{repo}:1")
    assert skopeo.inspect_raw(ref) == index.index_bytes
    skopeo.copy(ref, f"oci:{tmp_path / 'back'}:1")
    layout, entry = pulled_layout(tmp_path / "back")
    assert entry["digest"] == index.index_digest
    for image in index.images.values():
        assert_same_blobs(image, layout)


def test_count_requests_sees_each_blob_get(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    image = image_factory.image("v1", layers=[1000, 2000])
    registry.push(image.layout, image.tag, f"{repo}:v1")
    since = registry.mark()
    skopeo.copy(registry.ref(f"{repo}:v1"), f"oci:{tmp_path / 'back'}:v1")
    own_blobs = rf"^/v2/{repo}/blobs/sha256:"
    assert registry.count_requests("GET", own_blobs, since=since) == 3  # config + 2 layers
    assert registry.count_requests("GET", rf"^/v2/{repo}/manifests/v1$", since=since) == 1


@pytest.mark.e2e  # starts its own registry rather than using the session fixture
def test_registry_restarts_on_same_port_with_same_storage(tmp_path: Path, image_factory: ImageFactory) -> None:
    image = image_factory.image("v1", layers=[100])
    with Registry(tmp_path / "reg") as upstream:
        ref = upstream.push(image.layout, image.tag, "library/keep:v1")
        upstream.stop()
        assert http_status(f"{upstream.url}/v2/") is None
        upstream.start()
        assert skopeo.inspect_raw(ref) == image.manifest_bytes


def test_distribution_proxy_mode_pulls_through(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    image = image_factory.image("v1", layers=[1000])
    registry.push(image.layout, image.tag, f"{repo}:v1")
    since = registry.mark()
    with Registry(tmp_path / "proxy", proxy_remoteurl=registry.url) as cache:
        skopeo.copy(cache.ref(f"{repo}:v1"), f"oci:{tmp_path / 'cold'}:v1")
        cold = registry.count_requests("GET", rf"^/v2/{repo}/blobs/", since=since)
        skopeo.copy(cache.ref(f"{repo}:v1"), f"oci:{tmp_path / 'warm'}:v1")
        warm = registry.count_requests("GET", rf"^/v2/{repo}/blobs/", since=since) - cold
        assert_same_blobs(image, OciLayout(tmp_path / "warm"))
    # Cold: every blob fetched (the layer even twice: Distribution streams to the client
    # and stores with a second upstream GET); warm: served from the cache's storage.
    assert cold >= len(image.blob_digests)
    assert warm == 0


# -- token auth --------------------------------------------------------------------------
def test_anonymous_request_gets_bearer_challenge(auth_registry: Registry, token_server: TokenServer, repo: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{auth_registry.url}/v2/{repo}/manifests/v1")
    challenge = caught.value.headers["WWW-Authenticate"]
    assert caught.value.code == 401
    assert challenge == (
        f'Bearer realm="{token_server.realm}",service="pullgate-test-registry",scope="repository:{repo}:pull"'
    )


@pytest.mark.parametrize(
    ("creds", "expected_error"),
    [
        (("pusher", "push-secret"), None),
        (("pusher", "wrong"), "401"),
        (None, "authentication required"),
    ],
)
def test_token_auth_pull(
    auth_registry: Registry,
    token_server: TokenServer,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    creds: tuple[str, str] | None,
    expected_error: str | None,
) -> None:
    image = image_factory.image("v1", layers=[1000])
    ref = auth_registry.push(image.layout, image.tag, f"{repo}:v1")
    before = token_server.request_count
    dest = f"oci:{tmp_path / 'back'}:v1"
    if expected_error is None:
        skopeo.copy(ref, dest, src_creds=creds)
        assert_same_blobs(image, pulled_layout(tmp_path / "back")[0])
    else:
        with pytest.raises(CommandError, match=expected_error):
            skopeo.copy(ref, dest, src_creds=creds)
    assert token_server.request_count > before


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (
            "repository:library/app:pull,push",
            {"type": "repository", "name": "library/app", "actions": ["pull", "push"]},
        ),
        (
            "repository:127.0.0.1:5000/app:pull",
            {"type": "repository", "name": "127.0.0.1:5000/app", "actions": ["pull"]},
        ),
        ("registry:catalog:*", {"type": "registry", "name": "catalog", "actions": ["*"]}),
        ("garbage", None),
    ],
)
def test_parse_scope(scope: str, expected: dict[str, Any] | None) -> None:
    assert parse_scope(scope) == expected


# -- containerd --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("docker.io/library/app:1", "docker.io"),
        ("ghcr.io/org/app:1", "ghcr.io"),
        ("127.0.0.1:5000/app:1", "127.0.0.1:5000"),
        ("localhost/app:1", "localhost"),
    ],
)
def test_registry_of(ref: str, expected: str) -> None:
    assert registry_of(ref) == expected


def test_hosts_toml_names_mirror_before_server() -> None:
    assert hosts_toml("https://registry-1.docker.io", "http://127.0.0.1:5000") == (
        'server = "https://registry-1.docker.io"\n\n'
        '[host."http://127.0.0.1:5000"]\n  capabilities = ["pull", "resolve"]\n'
    )


def test_containerd_pulls_index_through_mirror_entry(
    containerd: Containerd, registry: Registry, image_factory: ImageFactory, repo: str
) -> None:
    index = image_factory.index("1", layers=[200_000, 3000])
    registry.push(index.layout, index.tag, f"{repo}:1")
    since = registry.mark()
    namespace = containerd.new_namespace()
    digest = containerd.pull(f"docker.io/{repo}:1", registry.url, namespace=namespace)
    assert digest == index.index_digest
    amd64 = index.images["linux/amd64"]
    assert containerd.content_digests(namespace=namespace) == {index.index_digest, *amd64.all_digests}
    source = OciLayout(index.layout)
    for blob in amd64.all_digests:
        assert containerd.content_get(blob, namespace=namespace) == source.blob_path(blob).read_bytes()
    entries = [e for e in registry.access_log(since=since) if e.path.startswith(f"/v2/{repo}/")]
    assert {e.query for e in entries} == {"ns=docker.io"}
    assert {e.user_agent for e in entries} == {"containerd/1.6.20~ds1"}
    assert [e.method for e in entries if "/manifests/1" in e.path] == ["HEAD"]
    assert registry.count_requests("GET", rf"^/v2/{repo}/blobs/", since=since) == 3


def test_containerd_fresh_namespace_fetches_again(
    containerd: Containerd, registry: Registry, image_factory: ImageFactory, repo: str
) -> None:
    index = image_factory.index("1")
    registry.push(index.layout, index.tag, f"{repo}:1")
    since = registry.mark()
    for _ in range(2):
        containerd.pull(
            f"docker.io/{repo}:1", registry.url, platform="linux/arm64", namespace=containerd.new_namespace()
        )
    arm64 = index.images["linux/arm64"]
    assert registry.count_requests("GET", rf"^/v2/{repo}/blobs/", since=since) == 2 * len(arm64.blob_digests)


async def test_async_twins_leave_the_event_loop_running(
    containerd: Containerd, registry: Registry, image_factory: ImageFactory, repo: str
) -> None:
    image = image_factory.image("v1", layers=[1000])
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    try:
        await registry.apush(image.layout, image.tag, f"{repo}:v1")
        digest = await containerd.apull(f"docker.io/{repo}:v1", registry.url, namespace=containerd.new_namespace())
    finally:
        ticker.cancel()
    assert digest == image.manifest_digest
    assert ticks > 5
    assert await registry.acount_requests("GET", rf"^/v2/{repo}/blobs/") == 2


async def test_a_hung_tasks_awaits_are_named_down_to_the_future() -> None:
    """tests.support.hangs: what a timed-out test prints for each asyncio task."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits_for_nothing() -> None:
        await never

    async def outer() -> None:
        await waits_for_nothing()

    task = asyncio.ensure_future(outer())
    await asyncio.sleep(0)
    try:
        lines = hangs.awaiting(task.get_coro())
    finally:
        task.cancel()
    assert [line.rpartition(" in ")[2] for line in lines[:2]] == ["outer", "waits_for_nothing"]
    assert lines[2].startswith("awaits ")
