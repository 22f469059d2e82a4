"""The cache tools end to end, as an SRE runs them (``python -m proxy ...`` processes) with
the real clients: warm from the real registry, export, and ``skopeo copy oci-archive:``
into another registry with identical digests; an archive written by skopeo imported and
pulled by containerd through the mirror with no upstream at all — also into the cache of a
daemon that is running; damaged archives rejected with nothing imported; prune keeping
every blob a kept image needs."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.http.app import create_app
from tests.support import skopeo
from tests.support.aio import ServerFactory
from tests.support.containerd import Containerd
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory, IndexInfo, OciLayout
from tests.support.procs import Completed, arun, free_port
from tests.support.registry import Registry


def dead_upstream() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: every upstream request fails


def write_config(path: Path, cache: Path, upstream_url: str) -> Path:
    config = {
        "cache": {"dir": str(cache)},
        "upstreams": [{"name": "docker.io", "url": upstream_url}],
        "timeouts": {"connect": "2s", "retries": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def pullgate(config: Path, *args: str, expect: int = 0) -> Completed:
    done = await arun([sys.executable, "-m", "proxy", *args, "--config", str(config)], timeout=180, check=False)
    assert done.returncode == expect, f"pullgate {' '.join(args)} -> {done.returncode}\n{done.stderr}"
    return done


async def pullgate_json(config: Path, *args: str) -> Any:
    return json.loads((await pullgate(config, *args, "--json")).stdout)


async def start_mirror(aiohttp_server: ServerFactory, cache: Path, upstream_url: str) -> str:
    config = Config(
        cache=CacheConfig(dir=cache),
        upstreams=(UpstreamConfig("docker.io", upstream_url),),
        timeouts=TimeoutConfig(connect=1, read=5, manifest=2, retries=0, backoff=0.05),
    )
    server = await aiohttp_server(create_app(config))
    return f"http://{server.host}:{server.port}"


@pytest.fixture
def other_registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "other") as started:
        yield started


@pytest.fixture
async def pushed(registry: Registry, image_factory: ImageFactory, repo: str) -> IndexInfo:
    index = image_factory.index("1", layers=[300_000, 4_000])
    await registry.apush(index.layout, index.tag, f"{repo}:1")
    return index


async def test_warm_export_then_skopeo_copy_reproduces_identical_digests(
    registry: Registry, other_registry: Registry, pushed: IndexInfo, repo: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "pullgate.yaml", tmp_path / "cache", registry.url)
    (warmed,) = await pullgate_json(config, "warm", f"{repo}:1")
    assert warmed["digest"] == pushed.index_digest and warmed["error"] is None
    (listed,) = await pullgate_json(config, "cache", "ls")
    assert listed["platforms"] == ["linux/amd64", "linux/arm64"] and listed["complete"]
    archive = tmp_path / "images.tar"
    exported = await pullgate_json(config, "export", f"docker.io/{repo}:1", "-o", str(archive))
    assert [e["annotations"]["org.opencontainers.image.ref.name"] for e in exported["images"]] == [
        f"docker.io/{repo}:1"
    ]

    await skopeo.acopy(f"oci-archive:{archive}:docker.io/{repo}:1", other_registry.ref("copy/app:1"))
    assert await skopeo.ainspect_raw(other_registry.ref("copy/app:1")) == pushed.index_bytes
    for platform, image in pushed.images.items():
        raw = await skopeo.ainspect_raw(other_registry.ref(f"copy/app@{image.manifest_digest}"))
        assert raw == image.manifest_bytes, platform


async def test_skopeo_archive_imports_and_containerd_pulls_it_with_no_upstream(
    containerd: Containerd, aiohttp_server: ServerFactory, image_factory: ImageFactory, tmp_path: Path
) -> None:
    index = image_factory.index("1", layers=[250_000, 2_000])
    archive = tmp_path / "skopeo.tar"
    await skopeo.acopy(f"oci:{index.layout}:1", f"oci-archive:{archive}:acme/offline:1")
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "pullgate.yaml", cache, dead_upstream())
    imported = await pullgate_json(config, "import", str(archive))
    assert [(i["reference"], i["digest"], i["pinned"]) for i in imported["images"]] == [
        ("docker.io/acme/offline:1", index.index_digest, True)
    ]
    mirror = await start_mirror(aiohttp_server, cache, dead_upstream())
    for platform in ("linux/amd64", "linux/arm64"):
        namespace = containerd.new_namespace()
        digest = await containerd.apull("docker.io/acme/offline:1", mirror, platform=platform, namespace=namespace)
        assert digest == index.index_digest
        assert set(index.images[platform].layer_digests) <= containerd.content_digests(namespace=namespace)


async def test_import_into_the_cache_of_a_running_daemon(
    containerd: Containerd, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = image_factory.image("1", layers=[120_000])
    archive = tmp_path / "app.tar"
    await skopeo.acopy(f"oci:{image.layout}:1", f"oci-archive:{archive}:1.0")  # a bare tag: needs --image
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "pullgate.yaml", cache, dead_upstream())
    settings = yaml.safe_load(config.read_text())
    upstream = settings.pop("upstreams")[0]["url"]
    with Daemon(tmp_path / "daemon", upstream, **settings) as daemon:
        failed = await pullgate(config, "import", str(archive), expect=1)
        assert "--image" in failed.stderr
        await pullgate(config, "import", str(archive), "--image", "docker.io/acme/live")
        ref = "docker.io/acme/live:1.0"
        digest = await containerd.apull(ref, daemon.url(""), namespace=containerd.new_namespace())
        assert digest == image.manifest_digest
        (listed,) = await pullgate_json(config, "cache", "ls")
        assert listed["reference"] == ref
    assert "Traceback" not in daemon.events_text()


def damage(archive: bytes, how: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
    if how == "flip":
        data = bytearray(archive)
        data[big.offset_data + 1000] ^= 0x01
        return bytes(data)
    return archive[: big.offset_data + big.size // 3]


@pytest.mark.parametrize(("how", "message"), [("flip", "digest mismatch"), ("truncate", "corrupt or truncated")])
async def test_damaged_archive_is_rejected_with_nothing_imported(
    registry: Registry, pushed: IndexInfo, repo: str, tmp_path: Path, how: str, message: str
) -> None:
    config = write_config(tmp_path / "pullgate.yaml", tmp_path / "cache", registry.url)
    await pullgate(config, "warm", f"{repo}:1")
    await pullgate(config, "export", f"{repo}:1", "-o", str(tmp_path / "good.tar"))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(damage((tmp_path / "good.tar").read_bytes(), how))
    other = write_config(tmp_path / "other.yaml", tmp_path / "other-cache", registry.url)
    failed = await pullgate(other, "import", str(bad), expect=1)
    assert message in failed.stderr and "Traceback" not in failed.stderr
    assert await pullgate_json(other, "cache", "ls", "--all") == []
    assert not any(p.is_file() for p in (tmp_path / "other-cache" / "blobs").rglob("*"))
    assert list((tmp_path / "other-cache" / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["export", "nothere:1", "-o", "OUT"], 1, "image not cached: nothere:1"),
        (["cache", "inspect", "nothere:1"], 1, "image not cached"),
        (["export", "quay.io/a/b:1", "-o", "OUT"], 1, "not mirrored"),
        (["import", "MISSING"], 1, "no.tar: No such file or directory"),
        (["warm"], 2, "no images given"),
        (["warm", "nothere:1"], 1, "unknown upstream"),
        (["cache", "prune", "--older-than", "soon"], 2, "not a duration"),
        (["warm", "x:1", "--platform", "linux"], 2, "os/arch"),
    ],
)
async def test_clear_errors_and_exit_codes(
    registry: Registry, pushed: IndexInfo, repo: str, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    config = write_config(tmp_path / "pullgate.yaml", tmp_path / "cache", registry.url)
    await pullgate(config, "warm", f"{repo}:1")
    args = [a.replace("OUT", str(tmp_path / "out.tar")).replace("MISSING", str(tmp_path / "no.tar")) for a in args]
    failed = await pullgate(config, *args, expect=code)
    assert message in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "out.tar").exists()


async def test_cache_without_a_catalog_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pullgate.yaml", tmp_path / "nowhere", dead_upstream())
    failed = await pullgate(config, "cache", "ls", expect=1)
    assert "no cache at" in failed.stderr
    assert not (tmp_path / "nowhere").exists()


async def test_prune_keeps_what_kept_images_need_and_they_still_pull(
    registry: Registry, aiohttp_server: ServerFactory, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    # Same seed and layers: the two images share their layers (and differ in their label).
    keep = image_factory.image("1", layers=[200_000, 3_000], seed="base", labels={"name": "keep"})
    drop = image_factory.image("1", layers=[200_000, 3_000], seed="base", labels={"name": "drop"})
    await registry.apush(keep.layout, "1", f"{repo}-keep:1")
    await registry.apush(drop.layout, "1", f"{repo}-drop:1")
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "pullgate.yaml", cache, registry.url)
    await pullgate(config, "warm", f"{repo}-keep:1", f"{repo}-drop:1")
    usage = await pullgate_json(config, "cache", "du")
    assert usage["savings"] == sum(keep.layer_sizes)
    dry = await pullgate_json(config, "cache", "prune", "--repository", f"{repo}-drop", "--dry-run")
    assert [i["digest"] for i in dry["images"]] == [drop.manifest_digest] and dry["objects"] == 2  # manifest, config
    assert (await pullgate_json(config, "cache", "du"))["on_disk"] == usage["on_disk"]
    pruned = await pullgate_json(config, "cache", "prune", "--repository", f"{repo}-drop")
    assert pruned["freed"] == len(drop.manifest_bytes) + len(drop.config_bytes)
    assert [i["reference"] for i in await pullgate_json(config, "cache", "ls")] == [f"docker.io/{repo}-keep:1"]
    details = await pullgate_json(config, "cache", "inspect", f"{repo}-keep:1")
    assert [layer["cached"] for layer in details["platforms"][0]["layers"]] == [True, True]
    # Every blob of the kept image is still there: it pulls with the upstream gone.
    mirror = await start_mirror(aiohttp_server, cache, dead_upstream())
    host = mirror.removeprefix("http://")
    await skopeo.acopy(f"docker://{host}/{repo}-keep:1", f"oci:{tmp_path / 'pulled'}:x")
    assert OciLayout(tmp_path / "pulled").tagged("x")["digest"] == keep.manifest_digest


async def test_inspect_shows_which_image_rules_an_image_would_fail(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    root = image_factory.image("1", layers=[1_000], env=["PATH=/usr/bin", "DB_PASSWORD=hunter2-is-not-a-good-one"])
    await registry.apush(root.layout, "1", f"{repo}:1")
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: hygiene}\n"
        'spec:\n  match: {images: ["**"]}\n  rules:\n    image: {denyRootUser: true, denySecretsInEnv: true}\n'
    )
    config = write_config(tmp_path / "config.yaml", tmp_path / "cache", registry.url)
    await pullgate(config, "warm", f"{repo}:1")
    details = await pullgate_json(config, "cache", "inspect", f"{repo}:1", "--policies", str(policies))
    findings = "\n".join(details["policy_findings"])
    assert "policy hygiene (enforce) image.denyRootUser" in findings
    assert "DB_PASSWORD" in findings and "hunter2" not in findings, "names the variable, never its value"
    text = (await pullgate(config, "cache", "inspect", f"{repo}:1", "--policies", str(policies))).stdout
    assert "POLICY       2 image rule violation(s)" in text


async def test_export_loads_into_podman(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    """``podman load`` (containers/storage with the vfs driver, in a temp dir) reads the
    exported OCI archive and keeps the manifest digest."""
    image = image_factory.image("1", layers=[20_000, 3_000])
    await registry.apush(image.layout, "1", f"{repo}:1")
    config = write_config(tmp_path / "pullgate.yaml", tmp_path / "cache", registry.url)
    await pullgate(config, "warm", f"{repo}:1")
    archive = tmp_path / "podman.tar"
    await pullgate(config, "export", f"docker.io/{repo}:1", "-o", str(archive))
    storage = tmp_path / "storage.conf"
    storage.write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{tmp_path / "run"}"\ngraphroot = "{tmp_path / "graph"}"\n'
    )
    podman = ["podman", "--cgroup-manager=cgroupfs", "--events-backend=none"]
    env = {"CONTAINERS_STORAGE_CONF": str(storage)}
    loaded = await arun([*podman, "load", "-i", str(archive)], timeout=120, env=env)
    assert f"docker.io/{repo}:1" in loaded.stdout + loaded.stderr
    listed = await arun([*podman, "images", "--digests", "--format", "json"], timeout=60, env=env)
    (entry,) = json.loads(listed.stdout)
    assert entry["Digest"] == image.manifest_digest
