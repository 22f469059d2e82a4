"""Export and import of OCI image-layout tarballs (``proxy.inventory.export``, ``proxy.inventory.imports``) on
real caches: round trips keep every byte and tag (signatures and referrers included),
damaged or ill-named archives are rejected with nothing imported, skopeo reads what we write
and we read what skopeo writes, and memory stays flat however big the image."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import PullgateError
from proxy.inventory.export import CONTAINERD_NAME, REF_NAME, ArchiveInvalid, CacheCorrupt, export_to_file, plan_export
from proxy.inventory.images import PINNED, ImageNotCached
from proxy.inventory.imports import Target, commit, plan_import, stage
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import OCI_MANIFEST
from proxy.registry.routing import Router
from tests.support.images import OciLayout, build_image, build_index
from tests.test_inventory import CacheContent, sig_tag

REGISTRIES = {"docker.io": "docker.io", "ghcr.io": "ghcr.io"}
Files = dict[str, bytes]


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[CacheContent]:
    built = CacheContent(tmp_path / "source")
    yield built
    built.close()


@pytest.fixture
async def dest(tmp_path: Path) -> AsyncIterator[CacheContent]:
    built = CacheContent(tmp_path / "dest")
    yield built
    built.close()


async def run_import(cache: CacheContent, archive: Path, image: str | None = None) -> list[Target]:
    staged = stage(archive, cache.store)
    try:
        targets = plan_import(staged, cache.store, Router(cache.config), REGISTRIES, image)
        for target in targets:
            await commit(target, staged, cache.store, cache.catalog, PINNED)
    finally:
        staged.discard()
    return targets


def export(cache: CacheContent, refs: list[str], path: Path, **options: Any) -> Path:
    export_to_file(cache.store, plan_export(cache.inventory(), refs, **options), path)
    return path


def assert_nothing_imported(cache: CacheContent) -> None:
    rows = cache.catalog.inventory()
    assert (rows.images, rows.tags) == ([], [])
    assert not any(p.is_file() for p in cache.store.blobs.rglob("*"))
    assert list(cache.store.tmp.iterdir()) == []


def write_tar(path: Path, files: Files) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def layout_files(root: Path) -> Files:
    """An OCI layout directory as archive members, blobs first (skopeo's order)."""
    files = {f"blobs/sha256/{p.name}": p.read_bytes() for p in sorted((root / "blobs" / "sha256").iterdir())}
    return files | {"index.json": (root / "index.json").read_bytes(), "oci-layout": (root / "oci-layout").read_bytes()}


def with_index(files: Files, entries: list[dict[str, Any]]) -> Files:
    return files | {"index.json": json.dumps({"schemaVersion": 2, "manifests": entries}).encode()}


# --- round trips ------------------------------------------------------------------------------------
async def test_round_trip_keeps_bytes_tags_and_attachments(
    source: CacheContent, dest: CacheContent, tmp_path: Path
) -> None:
    amd = await source.image("library/app", layers=[20_000, 300])
    arm = await source.image("library/app", layers=[20_000, 400], platform="linux/arm64")
    index = await source.index("library/app", "1", [amd, arm])
    signature = await source.signature("library/app", index, b"signature")
    referrer = await source.image("library/app", None, layers=[b"sbom"], subject=index)
    tool = await source.image("acme/tool", "2", upstream="ghcr.io")
    archive = export(source, ["app:1", "ghcr.io/acme/tool:2"], tmp_path / "out.tar")

    targets = await run_import(dest, archive)
    assert sorted(t.reference for t in targets) == [
        "docker.io/library/app:1",
        f"docker.io/library/app:{sig_tag(index)}",
        f"docker.io/library/app@{referrer['digest']}",
        "ghcr.io/acme/tool:2",
    ]
    for digest in source.inventory().snap.sizes:
        assert dest.store.read_blocking(Digest.parse(digest)) == source.store.read_blocking(Digest.parse(digest))
    entry = dest.catalog.tag("docker.io", "library/app", "1")
    assert entry is not None and str(entry.digest) == index["digest"] and entry.checked == PINNED
    assert dest.catalog.tag("docker.io", "library/app", sig_tag(index)) is not None
    listed = {i.digest for i in dest.inventory().images(attachments=True)}
    assert listed == {index["digest"], signature["digest"], referrer["digest"], tool["digest"]}
    # Importing again changes nothing and writes nothing new.
    again = await run_import(dest, archive)
    assert len(again) == 4 and list(dest.store.tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("refs", "options", "error", "entries"),
    [
        (["app:1"], {}, ImageNotCached, None),  # one platform is not cached
        (["app:1"], {"partial": True}, None, ["docker.io/library/app:1"]),
        (["app:2"], {}, ImageNotCached, None),
        (["ghcr.io/library/app:1"], {}, ImageNotCached, None),
        (["single:1"], {}, None, ["docker.io/library/single:1", "docker.io/library/single:" + "SIG"]),
        (["single:1"], {"attachments": False}, None, ["docker.io/library/single:1"]),
        (["single@DIGEST"], {"attachments": False}, None, ["docker.io/library/single@DIGEST"]),
    ],
)
async def test_plan_export(
    source: CacheContent,
    refs: list[str],
    options: dict[str, Any],
    error: type[PullgateError] | None,
    entries: list[str] | None,
) -> None:
    amd = await source.image("library/app", layers=[100])
    absent = {
        "mediaType": OCI_MANIFEST,
        "digest": str(Digest.of(b"gone")),
        "size": 4,
        "platform": {"os": "linux", "architecture": "arm64"},
    }
    await source.index("library/app", "1", [amd, absent])
    single = await source.image("library/single", "1")
    await source.signature("library/single", single, b"sig")
    refs = [r.replace("DIGEST", single["digest"]) for r in refs]
    if error is not None:
        with pytest.raises(error):
            plan_export(source.inventory(), refs, **options)
        return
    plan = plan_export(source.inventory(), refs, **options)
    expected = [e.replace("SIG", sig_tag(single)).replace("DIGEST", single["digest"]) for e in entries or []]
    assert [e.name for e in plan.entries] == expected
    assert all(source.store.size(Digest.parse(d)) == size for d, size in plan.blobs.items())


async def test_export_of_a_damaged_cache_fails_and_leaves_no_file(source: CacheContent, tmp_path: Path) -> None:
    image = await source.image("library/app", "1", layers=[5000])
    layer = json.loads(source.store.read_blocking(Digest.parse(image["digest"])) or b"")["layers"][0]["digest"]
    path = source.store.path(Digest.parse(layer))
    path.write_bytes(b"x" + path.read_bytes()[1:])  # bit rot: same size, other content
    with pytest.raises(CacheCorrupt, match="does not match its digest"):
        export(source, ["app:1"], tmp_path / "out.tar")
    assert not any(name.endswith((".tar", ".part")) for name in os.listdir(tmp_path))


# --- damaged and ill-named archives ------------------------------------------------------------------
def flip_in_largest_blob(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = max(tar.getmembers(), key=lambda m: m.size)
    damaged = bytearray(data)
    damaged[member.offset_data + member.size // 2] ^= 0xFF
    return bytes(damaged)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def cut(where: Callable[[list[tarfile.TarInfo]], int]) -> Callable[[bytes], bytes]:
    return lambda data: data[: where(members(data))]


def largest(found: list[tarfile.TarInfo]) -> tarfile.TarInfo:
    return max(found, key=lambda m: m.size)


def flip_header_of_largest(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[largest(members(data)).offset + 10] ^= 0xFF  # in the name: the header checksum fails
    return bytes(damaged)


def drop_layer(files: Files, info: Any) -> Files:
    return {k: v for k, v in files.items() if not k.endswith(info.layer_digests[0].partition(":")[2])}


def bad_size(files: Files, info: Any) -> Files:
    return with_index(
        files,
        [{"mediaType": OCI_MANIFEST, "digest": info.manifest_digest, "size": 1, "annotations": {REF_NAME: "a:1"}}],
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_in_largest_blob, "digest mismatch"),
        (flip_header_of_largest, "is missing"),  # tarfile stops at a bad header: what follows is missing
        (cut(lambda m: largest(m).offset_data + largest(m).size // 2), "corrupt or truncated"),
        (cut(lambda m: m[-1].offset_data + m[-1].size // 2), "corrupt or truncated"),
        (cut(lambda m: m[-1].offset + 100), "end-of-archive"),
        (cut(lambda m: m[-1].offset_data + -(-m[-1].size // 512) * 512), "end-of-archive"),
        (cut(lambda m: 1024), "oci-layout or index.json missing|end-of-archive"),
        (lambda data: b"", "is not a tar archive"),
        (lambda data: os.urandom(4096), "is not a tar archive"),
    ],
)
async def test_damaged_archives_are_rejected_with_nothing_imported(
    source: CacheContent, dest: CacheContent, tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    await source.image("library/app", "1", layers=[200_000, 3000])
    good = export(source, ["app:1"], tmp_path / "good.tar").read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(damage(good))
    with pytest.raises(ArchiveInvalid, match=message):
        await run_import(dest, bad)
    assert_nothing_imported(dest)


@pytest.mark.parametrize(
    ("change", "image", "message"),
    [
        (drop_layer, None, "blob sha256:.* is missing"),
        (bad_size, None, "descriptor says 1"),
        (lambda files, info: {k: v for k, v in files.items() if k != "oci-layout"}, None, "oci-layout"),
        (lambda files, info: {k: v for k, v in files.items() if k != "index.json"}, None, "index.json"),
        (lambda files, info: files | {"oci-layout": b'{"imageLayoutVersion":"2.0.0"}'}, None, "imageLayoutVersion"),
        (lambda files, info: with_index(files, []), None, "lists no images"),
        (lambda files, info: files | {"index.json": b"[1]"}, None, "not a JSON object"),
    ],
)
async def test_ill_formed_layouts_are_rejected(
    dest: CacheContent, tmp_path: Path, change: Callable[[Files, Any], Files], image: str | None, message: str
) -> None:
    info = build_image(tmp_path / "layout", "app:1", layers=[5000, 100])
    archive = write_tar(tmp_path / "bad.tar", change(layout_files(tmp_path / "layout"), info))
    with pytest.raises(ArchiveInvalid, match=message):
        await run_import(dest, archive, image)
    assert_nothing_imported(dest)


@pytest.mark.parametrize(
    ("annotations", "image", "expected"),
    [
        ({REF_NAME: "docker.io/library/app:1"}, None, ("docker.io", "library/app", "1")),
        ({REF_NAME: "app:1"}, None, ("docker.io", "library/app", "1")),
        ({REF_NAME: "ghcr.io/acme/app:2"}, None, ("ghcr.io", "acme/app", "2")),
        # An --image that cannot apply is refused, never silently ignored (issue 15, item 18).
        ({REF_NAME: "docker.io/library/app:1"}, "ghcr.io/x/y", "--image ghcr.io/x/y does not apply"),
        ({REF_NAME: "1.25"}, "docker.io/acme/app", ("docker.io", "acme/app", "1.25")),
        ({REF_NAME: "1.25"}, "acme/app:9", "its tag :9 can only name a lone unnamed entry"),
        ({REF_NAME: "1.25", CONTAINERD_NAME: "ghcr.io/acme/app:1.25"}, None, ("ghcr.io", "acme/app", "1.25")),
        ({}, "acme/app:3", ("docker.io", "acme/app", "3")),
        ({}, "acme/app", ("docker.io", "acme/app", None)),  # by digest only
        ({REF_NAME: "docker.io/library/app@DIGEST"}, None, ("docker.io", "library/app", None)),
        ({REF_NAME: "app:5@DIGEST"}, None, ("docker.io", "library/app", "5")),
        ({REF_NAME: "1.25"}, None, "tagged '1.25' but names no repository"),
        ({}, None, "has no name"),
        ({REF_NAME: "quay.io/x/y:1"}, None, "not mirrored"),
        ({REF_NAME: "docker.io/library/app@sha256:" + "0" * 64}, None, "different digest"),
        ({REF_NAME: "Bad/Name:1"}, None, "'Bad' is not a registry host"),
        ({REF_NAME: "library/Bad:1"}, None, "repository names are lowercase"),
    ],
)
async def test_import_names(
    dest: CacheContent, tmp_path: Path, annotations: dict[str, str], image: str | None, expected: tuple[str, ...] | str
) -> None:
    info = build_image(tmp_path / "layout", None, layers=[100])
    annotations = {k: v.replace("DIGEST", info.manifest_digest) for k, v in annotations.items()}
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": info.manifest_digest,
        "size": len(info.manifest_bytes),
        "annotations": annotations,
    }
    archive = write_tar(tmp_path / "a.tar", with_index(layout_files(tmp_path / "layout"), [entry]))
    if isinstance(expected, str):
        with pytest.raises(ArchiveInvalid, match=expected):
            await run_import(dest, archive, image)
        assert_nothing_imported(dest)
        return
    (target,) = await run_import(dest, archive, image)
    assert (target.upstream, target.repository, target.tag) == expected
    assert dest.catalog.has_image(target.upstream, target.repository, info.manifest_digest)
    if target.tag is not None:
        assert dest.catalog.tag(target.upstream, target.repository, target.tag) is not None


async def test_index_with_a_platform_left_out_imports_what_is_there(dest: CacheContent, tmp_path: Path) -> None:
    index = build_index(tmp_path / "layout", "1", layers=[100])
    files = layout_files(tmp_path / "layout")
    arm = index.images["linux/arm64"]
    files = {k: v for k, v in files.items() if not any(k.endswith(d.partition(":")[2]) for d in arm.all_digests)}
    entry = {
        "mediaType": index.media_type,
        "digest": index.index_digest,
        "size": len(index.index_bytes),
        "annotations": {REF_NAME: "app:1"},
    }
    (target,) = await run_import(dest, write_tar(tmp_path / "a.tar", with_index(files, [entry])))
    assert target.notes == ("platform linux/arm64 not in the archive",)
    (image,) = dest.inventory().images()
    assert image.missing_platforms == ("linux/arm64",)


# --- real tools --------------------------------------------------------------------------------------
def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", "copy", *args], check=True, capture_output=True, timeout=60)


async def test_skopeo_reads_our_archive_whole(source: CacheContent, tmp_path: Path) -> None:
    # Real gzip streams: skopeo recompresses a "tar+gzip" layer that is not gzip.
    amd = await source.image("library/app", layers=[gzip.compress(os.urandom(30_000))])
    arm = await source.image("library/app", layers=[gzip.compress(os.urandom(40_000))], platform="linux/arm64")
    index = await source.index("library/app", "1", [amd, arm])
    archive = export(source, ["app:1"], tmp_path / "out.tar")
    skopeo("--all", f"oci-archive:{archive}:docker.io/library/app:1", f"oci:{tmp_path / 'copy'}:x")
    copy = OciLayout(tmp_path / "copy")
    assert copy.tagged("x")["digest"] == index["digest"]
    for digest in source.inventory().snap.sizes:
        assert copy.blob_path(digest).read_bytes() == source.store.read_blocking(Digest.parse(digest))


async def test_archive_written_by_skopeo_imports(dest: CacheContent, tmp_path: Path) -> None:
    index = build_index(tmp_path / "layout", "multi", layers=[50_000, 700])
    archive = tmp_path / "skopeo.tar"
    skopeo("--all", f"oci:{tmp_path / 'layout'}:multi", f"oci-archive:{archive}:acme/app:7")
    (target,) = await run_import(dest, archive)
    assert (target.reference, target.digest) == ("docker.io/acme/app:7", index.index_digest)
    for digest in index.all_digests:
        expected = OciLayout(tmp_path / "layout").blob_path(digest).read_bytes()
        assert dest.store.read_blocking(Digest.parse(digest)) == expected


# --- memory ---------------------------------------------------------------------------------------------
async def test_export_and_import_stream_in_flat_memory(
    source: CacheContent, dest: CacheContent, tmp_path: Path
) -> None:
    big = await source.blob(os.urandom(64 << 20))
    await source.image("library/big", "1", layers=[big])
    tracemalloc.start()
    try:
        started = time.monotonic()
        archive = export(source, ["big:1"], tmp_path / "big.tar")
        _, export_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await run_import(dest, archive)
        _, import_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 30
    assert export_peak < 8 << 20, export_peak
    assert import_peak < 8 << 20, import_peak
    assert dest.store.size(Digest.parse(big["digest"])) == 64 << 20
