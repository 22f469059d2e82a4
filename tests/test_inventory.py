"""The cache's inventory on a real store and catalog: images with tags and platforms,
locating references, the inspect view (``proxy.inventory.listing``), disk usage with layer sharing,
and pruning that never removes a blob a kept manifest references.

``CacheContent`` writes objects the way the daemon does (blob committed, then its catalog
rows, written as the catalog's own ops), so these tests need no upstream; times come from
its ``now`` rather than the wall clock. ``tests/test_archive.py`` reuses it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import CacheConfig, Config, UpstreamConfig
from proxy.errors import NameInvalid, NameUnknown, PullgateError
from proxy.inventory import listing
from proxy.inventory.images import ImageNotCached, Inventory
from proxy.oci.artifacts import SIMPLESIGNING
from proxy.oci.digest import Digest
from proxy.oci.globs import GlobSet
from proxy.oci.mediatypes import OCI_INDEX, OCI_MANIFEST, parse_manifest
from proxy.registry.catalog import CatalogDatabase
from proxy.registry.catalog.ops import AddBlob, AddManifest, CountPulls, SetTag
from proxy.registry.routing import Router
from proxy.registry.store import BlobStore

DAY = 86400.0
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
Desc = dict[str, Any]


def make_config(root: Path) -> Config:
    return Config(
        cache=CacheConfig(dir=root),
        upstreams=(UpstreamConfig("docker.io", "http://127.0.0.1:9"), UpstreamConfig("ghcr.io", "http://127.0.0.1:9")),
    )


class CacheContent:
    """Builds cache content directly in a cache directory, as the daemon would store it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = make_config(root)
        self.store = BlobStore(root)
        self.store.open_blocking()
        self.catalog = CatalogDatabase(root / "catalog.db").open()
        self.now = time.time()  # when objects are added

    def inventory(self) -> Inventory:
        return Inventory(self.store, self.catalog, Router(self.config), self.config.upstreams).load()

    async def blob(self, data: bytes, media_type: str = LAYER, *, added: float | None = None) -> Desc:
        digest = Digest.of(data)
        await self.store.put(data, digest)
        self.catalog.write([AddBlob(str(digest), len(data), self.now if added is None else added)])
        return {"mediaType": media_type, "digest": str(digest), "size": len(data)}

    async def manifest(self, repo: str, doc: dict[str, Any], tag: str | None, upstream: str = "docker.io") -> Desc:
        data = json.dumps(doc).encode()
        digest = Digest.of(data)
        await self.store.put(data, digest)
        self.add_manifest(upstream, repo, data, tag)
        return {"mediaType": doc["mediaType"], "digest": str(digest), "size": len(data)}

    def add_manifest(self, upstream: str, repo: str, data: bytes, tag: str | None) -> None:
        digest, parsed = str(Digest.of(data)), parse_manifest(data, None)
        children = tuple(str(c.digest) for c in parsed.children)
        ops = [AddManifest(upstream, repo, digest, len(data), parsed.media_type, children, self.now)]
        self.catalog.write([*ops, *([SetTag(upstream, repo, tag, digest, self.now)] if tag else [])])

    async def image(
        self,
        repo: str,
        tag: str | None = None,
        *,
        layers: Sequence[int | bytes | Desc] = (1000,),
        platform: str = "linux/amd64",
        upstream: str = "docker.io",
        history: list[dict[str, Any]] | None = None,
        subject: Desc | None = None,
    ) -> Desc:
        descs = [
            x if isinstance(x, dict) else await self.blob(os.urandom(x) if isinstance(x, int) else x) for x in layers
        ]
        os_, arch = platform.split("/")[:2]
        config = {
            "os": os_,
            "architecture": arch,
            "config": {"Labels": {"unique": os.urandom(8).hex()}},  # no two test images share a config
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": history or [],
        }
        config_desc = await self.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": descs}
        if subject is not None:
            doc["subject"] = subject
        desc = await self.manifest(repo, doc, tag, upstream)
        return {**desc, "platform": {"os": os_, "architecture": arch}}

    async def signature(self, repo: str, of: Desc, payload: bytes = b"") -> Desc:
        """A cosign legacy signature of ``of`` under its ``sha256-<hex>.sig`` tag: a
        simplesigning layer (the structure that makes it a signature, not the tag)."""
        document = json.dumps({"critical": {"image": {"docker-manifest-digest": of["digest"]}}, "n": payload.hex()})
        layer = await self.blob(document.encode(), SIMPLESIGNING)
        return await self.image(repo, sig_tag(of), layers=[layer])

    async def index(self, repo: str, tag: str | None, children: Sequence[Desc], upstream: str = "docker.io") -> Desc:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(children)}
        return await self.manifest(repo, doc, tag, upstream)

    def pulled(self, repo: str, when: float, digest: str | None = None) -> None:
        """Count one pull at ``when`` of every manifest of ``repo`` (or of ``digest``)."""
        rows = self.catalog.inventory().images
        pulls = [(u, r, d, when, 1) for u, r, d, _, _ in rows if r == repo and digest in (None, d)]
        self.catalog.write([CountPulls(tuple(pulls))])

    def close(self) -> None:
        self.catalog.close()


@pytest.fixture
async def content(tmp_path: Path) -> AsyncIterator[CacheContent]:
    built = CacheContent(tmp_path / "cache")
    yield built
    built.close()


def sig_tag(desc: Desc) -> str:
    return str(desc["digest"]).replace(":", "-") + ".sig"


async def test_ls_lists_root_images_with_tags_platforms_and_sizes(content: CacheContent) -> None:
    base = await content.blob(os.urandom(5000))
    amd = await content.image("library/app", layers=[base, 700], platform="linux/amd64")
    arm = await content.image("library/app", layers=[base, 800], platform="linux/arm64")
    index = await content.index("library/app", "1", [amd, arm])
    content.catalog.write([SetTag("docker.io", "library/app", "latest", index["digest"], content.now)])
    one = await content.image("acme/tool", "2", layers=[300], upstream="ghcr.io", platform="linux/arm64")
    await content.signature("library/app", index, b"signature")

    images = {i.reference(): i for i in content.inventory().images()}
    assert set(images) == {"docker.io/library/app:1", "ghcr.io/acme/tool:2"}  # the signature is an attachment
    app = images["docker.io/library/app:1"]
    assert app.tags == ("1", "latest")
    assert app.platforms == ("linux/amd64", "linux/arm64") and app.missing_platforms == () and app.complete
    # The base layer both platforms share is counted once: image sizes add up to the store.
    every = content.inventory().images(attachments=True)
    assert sum(i.size for i in every) == content.catalog.totals()[0]
    assert images["ghcr.io/acme/tool:2"].platforms == ("linux/arm64",)
    assert images["ghcr.io/acme/tool:2"].digest == one["digest"]
    assert [i.subject for i in every if i.subject] == [index["digest"]]
    only = content.inventory().images(GlobSet.compile(["ghcr.io/**"]))
    assert [i.repository for i in only] == ["acme/tool"]


async def test_a_signature_shaped_tag_does_not_make_an_attachment(content: CacheContent) -> None:
    """Issue 13: what is a signature is decided by the artifact, not the tag. A runnable
    image pushed under ``sha256-<hex>.sig`` (or ``sha256-<hex>``) is listed as an image,
    exported and pruned as one; a real signature under the same kind of tag is an attachment."""
    app = await content.image("library/app", "1")
    disguised = await content.image("library/app", sig_tag(app), layers=[700])
    bare = await content.image("library/app", str(app["digest"]).replace(":", "-"), layers=[800])
    real = await content.signature("library/app", disguised)
    every = {i.digest: i for i in content.inventory().images(attachments=True)}
    assert every[disguised["digest"]].subject is None and every[bare["digest"]].subject is None
    assert every[real["digest"]].subject == disguised["digest"]
    listed = {i.digest for i in content.inventory().images()}
    assert listed == {app["digest"], disguised["digest"], bare["digest"]}


async def test_partial_index_reports_missing_platforms(content: CacheContent) -> None:
    amd = await content.image("library/part", platform="linux/amd64")
    absent = {
        "mediaType": OCI_MANIFEST,
        "digest": str(Digest.of(b"x")),
        "size": 1,
        "platform": {"os": "linux", "architecture": "s390x"},
    }
    await content.index("library/part", "1", [amd, absent])
    (image,) = content.inventory().images()
    assert image.platforms == ("linux/amd64", "linux/s390x")
    assert image.missing_platforms == ("linux/s390x",)
    assert not image.complete


@pytest.mark.parametrize(
    ("text", "expected", "error"),
    [
        ("app:1", "docker.io/library/app:1", None),
        ("docker.io/library/app:1", "docker.io/library/app:1", None),
        ("index.docker.io/library/app:1", "docker.io/library/app:1", None),
        ("DIGEST", "docker.io/library/app:1", None),
        ("app:2", None, ImageNotCached),
        ("other:1", None, ImageNotCached),
        ("quay.io/app:1", None, NameUnknown),
        ("App:1", None, NameInvalid),
        ("ghcr.io/library/app:1", None, ImageNotCached),
    ],
)
async def test_locate(
    content: CacheContent, text: str, expected: str | None, error: type[PullgateError] | None
) -> None:
    desc = await content.image("library/app", "1")
    text = text.replace("DIGEST", f"app@{desc['digest']}")
    inventory = content.inventory()
    if error is not None:
        with pytest.raises(error):
            inventory.locate(text)
        return
    image = inventory.locate(text)
    assert image.reference() == expected and image.digest == desc["digest"]


async def test_inspect_matches_history_to_layers(content: CacheContent) -> None:
    history: list[dict[str, Any]] = [
        {"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs"},
        {"created": "2024-01-02T00:00:00Z", "created_by": "ENV A=1", "empty_layer": True},
        {"created": "2024-01-03T00:00:00Z", "created_by": "RUN make"},
    ]
    desc = await content.image("library/hist", "1", layers=[100, 200], history=history)
    inventory = content.inventory()
    details = listing.inspect(inventory, inventory.locate("hist:1"))
    (platform,) = details["platforms"]
    assert platform["platform"] == "linux/amd64" and platform["digest"] == desc["digest"]
    assert [h["size"] for h in platform["history"]] == [100, 0, 200]
    assert [h["layer"] for h in platform["history"]] == [
        platform["layers"][0]["digest"],
        None,
        platform["layers"][1]["digest"],
    ]
    with pytest.raises(ImageNotCached):
        listing.inspect(inventory, inventory.locate("hist:1"), "linux/arm64")


async def test_du_counts_shared_layers_once(content: CacheContent) -> None:
    base = await content.blob(os.urandom(10_000))
    await content.image("library/a", "1", layers=[base, 1_000])
    await content.image("library/b", "1", layers=[base, 2_000])
    orphan = await content.blob(os.urandom(500))
    usage = content.inventory().usage()
    assert usage["savings"] == 10_000
    assert usage["logical"] - usage["stored"] == 10_000
    assert usage["unreferenced"] == orphan["size"] == 500
    assert usage["on_disk"] == content.catalog.totals()[0]
    assert [(r["repository"], r["images"]) for r in usage["repositories"]] == [("library/a", 1), ("library/b", 1)]


# --- prune ----------------------------------------------------------------------------------------
async def prune_scene(content: CacheContent) -> dict[str, Desc]:
    """app:1 (index, recent, shares a base layer with web:1) with a signature pulled long ago;
    web:1 and old:1 (+ its signature) not pulled for 40 days; ghcr.io/acme/tool:1 recent;
    one unreferenced blob from two hours ago and one from just now."""
    now = content.now
    base = await content.blob(os.urandom(4000))
    amd = await content.image("library/app", layers=[base, 100])
    arm = await content.image("library/app", layers=[base, 200], platform="linux/arm64")
    scene = {"app": await content.index("library/app", "1", [amd, arm]), "amd": amd, "base": base}
    scene["app-sig"] = await content.signature("library/app", scene["app"], b"sig-app")
    scene["web"] = await content.image("library/web", "1", layers=[base, 300])
    scene["old"] = await content.image("library/old", "1", layers=[400])
    scene["old-sig"] = await content.signature("library/old", scene["old"], b"sig-old")
    scene["tool"] = await content.image("acme/tool", "1", layers=[500], upstream="ghcr.io")
    scene["stale-orphan"] = await content.blob(os.urandom(50), added=now - 2 * 3600)
    scene["fresh-orphan"] = await content.blob(os.urandom(60))
    for repo in ("library/web", "library/old"):
        content.pulled(repo, now - 40 * DAY)
    content.pulled("library/app", now - 40 * DAY, scene["app-sig"]["digest"])
    content.pulled("library/app", now - 60, scene["app"]["digest"])
    content.pulled("acme/tool", now - 60)
    return scene


@pytest.mark.parametrize(
    ("older_than", "globs", "removed"),
    [
        (None, [], set()),
        (30 * DAY, [], {"web", "old", "old-sig"}),
        (None, ["library/old"], {"old", "old-sig"}),
        (30 * DAY, ["ghcr.io/**"], set()),
        (None, ["ghcr.io/**"], {"tool"}),
        (None, ["docker.io/library/*"], {"app", "app-sig", "web", "old", "old-sig"}),
        (60 * DAY, ["**"], set()),
    ],
)
async def test_prune_keeps_everything_a_kept_manifest_references(
    content: CacheContent, older_than: float | None, globs: list[str], removed: set[str]
) -> None:
    scene = await prune_scene(content)
    inventory = content.inventory()
    plan = inventory.plan_prune(older_than, GlobSet.compile(globs))
    names = {name for name, desc in scene.items() if desc["digest"] in {i.digest for i in plan.images}}
    assert names == removed
    assert scene["stale-orphan"]["digest"] in plan.blobs and scene["fresh-orphan"]["digest"] not in plan.blobs
    before = content.catalog.totals()[0]
    freed = inventory.prune(plan)
    assert freed == plan.bytes == before - content.catalog.totals()[0]
    owners = {"amd": {"app"}, "base": {"app", "web"}, "stale-orphan": set()}
    for name, desc in scene.items():
        gone = content.store.size(Digest.parse(desc["digest"])) is None
        assert gone == (owners.get(name, {name}) <= removed), name
    # The invariant: every object any remaining manifest references is still stored.
    snap = content.inventory().snap
    kept = [d for members in snap.rows.values() for d in members]
    for digest in snap.closure(kept):
        assert content.store.size(Digest.parse(digest)) is not None, digest


async def test_prune_of_one_repository_keeps_a_manifest_another_repository_holds(content: CacheContent) -> None:
    image = await content.image("library/one", "1", layers=[100])
    data = content.store.read_blocking(Digest.parse(image["digest"]))
    assert data is not None
    content.add_manifest("docker.io", "library/two", data, "1")
    inventory = content.inventory()
    plan = inventory.plan_prune(None, GlobSet.compile(["library/one"]))
    assert plan.blobs == () and [i.repository for i in plan.images] == ["library/one"]
    inventory.prune(plan)
    assert [i.reference() for i in content.inventory().images()] == ["docker.io/library/two:1"]
    assert content.catalog.tag("docker.io", "library/two", "1") is not None
    with pytest.raises(ImageNotCached):
        content.inventory().locate("one:1")
