"""``pullgate import``: load an OCI image-layout tarball (``pullgate export``'s, or one
written by ``skopeo copy ... oci-archive:FILE[:NAME]``, podman, buildkit) into the cache.

Naming: an entry's ``org.opencontainers.image.ref.name`` that is a full reference
(``docker.io/library/x:1``, also ``x:1``, normalised as Docker does) is used as is; a bare
tag (``1.25``, the image-layout spec's own example) or an entry without a name takes its
repository from ``--image`` (else from ``io.containerd.image.name``, as buildkit and ctr
write it); ``--image NAME:TAG`` also tags a lone unnamed entry, other unnamed entries are
imported by digest only. The registry must be a configured upstream.

The whole archive is read once into the cache's ``tmp/`` (blobs the store already holds are
only hashed), checking every blob's digest and size and every entry's graph and name;
nothing is committed unless all of it verified. Then each image's files are committed to the
store, and its catalog rows (blobs, manifests, the tag, and the proofs that the repository
holds each object — the operator's import vouches for it, pinned like the tag) in one
transaction, so neither the daemon nor a crash ever sees a tag or manifest whose content is
not there: imports are atomic per image. Memory stays flat
(1 MiB chunks).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import tarfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from proxy.errors import DigestInvalid, ManifestInvalid, NameInvalid, NameUnknown, TagInvalid
from proxy.inventory.export import CHUNK, CONTAINERD_NAME, REF_NAME, ArchiveInvalid, CacheCorrupt
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import ParsedManifest, parse_manifest
from proxy.oci.reference import ImageReference
from proxy.ops.progress import Task
from proxy.registry.catalog import CatalogDatabase
from proxy.registry.catalog.ops import AddBlob, AddManifest, Op, Prove, SetTag
from proxy.registry.routing import Router
from proxy.registry.store import BlobStore

_BLOB_PATH = re.compile(r"^blobs/([a-z0-9]+)/([a-f0-9]+)$")
_BARE_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
_MAX_INDEX = 16 << 20


# --- read and verify ---------------------------------------------------------------------
@dataclass(slots=True)
class Staged:
    """An archive read once: verified blobs (those the store lacks wait in its ``tmp/``)."""

    temps: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # every verified blob in the archive
    index: dict[str, Any] | None = None
    layout: bool = False
    written: int = 0

    def discard(self) -> None:
        for temp in self.temps.values():
            temp.unlink(missing_ok=True)
        self.temps.clear()


def stage(source: Path | BinaryIO, store: BlobStore, task: Task | None = None) -> Staged:
    """Read a whole archive (a file, or a pipe for ``-``), verifying every blob."""
    staged = Staged()
    try:
        tar = _open_tar(source)
    except (tarfile.ReadError, EOFError, zlib.error) as exc:
        raise ArchiveInvalid(
            f"{_name(source)} is not a tar archive (plain, or compressed with gzip, bzip2 or xz)"
        ) from exc
    except OSError as exc:
        raise ArchiveInvalid(f"cannot read {_name(source)}: {exc.strerror or exc}") from exc
    try:
        with tar:
            for member in tar:
                _stage_member(tar, member, staged, store, task)
            _check_end(tar)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        staged.discard()
        raise ArchiveInvalid(f"archive is corrupt or truncated: {exc}") from exc
    except OSError as exc:
        staged.discard()
        raise ArchiveInvalid(f"cannot read archive or stage its blobs: {exc.strerror or exc}") from exc
    except BaseException:
        staged.discard()
        raise
    if not staged.layout or staged.index is None:
        staged.discard()
        raise ArchiveInvalid("not a complete OCI image layout: oci-layout or index.json missing (truncated?)")
    return staged


def _name(source: Path | BinaryIO) -> str:
    return str(source) if isinstance(source, Path) else "the archive (stdin)"


def _open_tar(source: Path | BinaryIO) -> tarfile.TarFile:
    if isinstance(source, Path):
        return tarfile.open(source, mode="r:*")
    return tarfile.open(fileobj=source, mode="r|*", bufsize=CHUNK)


def _check_end(tar: tarfile.TarFile) -> None:
    """tarfile takes a missing or damaged header for the end of the archive: an uncompressed
    file must still hold the two zero blocks that really end one (POSIX ustar)."""
    raw = tar.fileobj
    if isinstance(raw, io.BufferedReader) and os.fstat(raw.fileno()).st_size - tar.offset < 2 * tarfile.BLOCKSIZE:
        raise ArchiveInvalid("archive is truncated: the end-of-archive marker is missing")


def _stage_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, staged: Staged, store: BlobStore, task: Task | None
) -> None:
    name = member.name.removeprefix("./")
    if name in ("index.json", "oci-layout"):
        data = _read_small(tar, member)
        doc = jsondoc.parse_object(data, name, error=ArchiveInvalid)
        if name == "index.json":
            staged.index = doc
        elif not str(doc.get("imageLayoutVersion", "")).startswith("1."):
            raise ArchiveInvalid(f"unsupported imageLayoutVersion {doc.get('imageLayoutVersion')!r}")
        else:
            staged.layout = True
        return
    match = _BLOB_PATH.match(name)
    if match is None:
        return  # directories, and what other formats add (docker's manifest.json, repositories)
    if not member.isreg():
        raise ArchiveInvalid(f"{name} is not a regular file")
    try:
        digest = Digest.parse(f"{match[1]}:{match[2]}")
    except DigestInvalid as exc:
        raise ArchiveInvalid(f"{name}: {exc.message}") from exc
    _stage_blob(tar, member, digest, staged, store, task)


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    if source is None or member.size > _MAX_INDEX:
        raise ArchiveInvalid(f"{member.name} is not a regular file of at most {_MAX_INDEX} bytes")
    return source.read()


def _stage_blob(
    tar: tarfile.TarFile, member: tarfile.TarInfo, digest: Digest, staged: Staged, store: BlobStore, task: Task | None
) -> None:
    key = str(digest)
    keep = key not in staged.sizes and store.size(digest) is None
    source = tar.extractfile(member)
    assert source is not None
    hasher = digest.hasher()
    out = None
    if keep:
        staged.temps[key] = temp = store.temp_path()
        out = temp.open("wb")
    try:
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
            if out is not None:
                out.write(chunk)
            if task is not None:
                task.advance(len(chunk))
    finally:
        if out is not None:
            out.close()
    if not digest.matches(hasher.hexdigest()):
        raise ArchiveInvalid(f"digest mismatch: blobs/{digest.algorithm}/{digest.hex} does not hash to its name")
    staged.sizes[key] = member.size
    staged.written += member.size if keep else 0


# --- plan and commit ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    """One archive entry as it goes into the cache."""

    upstream: str
    repository: str
    reference: str
    tag: str | None
    digest: str
    manifests: tuple[tuple[str, ParsedManifest, int], ...]  # children before parents
    blobs: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "upstream": self.upstream,
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "objects": len(self.manifests) + len(self.blobs),
            "size": sum(s for *_, s in self.manifests) + sum(s for _, s in self.blobs),
            "notes": list(self.notes),
        }


def plan_import(
    staged: Staged, store: BlobStore, router: Router, registries: Mapping[str, str], image: str | None = None
) -> list[Target]:
    """Every ``index.json`` entry checked and named; ``ArchiveInvalid`` on the first problem."""
    entries = (staged.index or {}).get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ArchiveInvalid("index.json lists no images")
    default = ImageReference.parse(image) if image else None
    explicit_tag = default.tag if default and image and ":" in image.rpartition("/")[2].partition("@")[0] else None
    unnamed = sum(1 for e in entries if isinstance(e, dict) and not (e.get("annotations") or {}).get(REF_NAME))
    if image:
        _check_image_option(image, entries, unnamed, explicit_tag)
    targets: dict[str, Target] = {}
    for entry in entries:
        target = _target(entry, staged, store, router, registries, default, explicit_tag if unnamed == 1 else None)
        if targets.get(target.reference, target).digest != target.digest:
            raise ArchiveInvalid(f"the archive names {target.reference} for two different images")
        targets[target.reference] = target
    return list(targets.values())


def _check_image_option(image: str, entries: list[Any], unnamed: int, tag: str | None) -> None:
    """``--image`` must apply to something, and its tag to exactly one entry: an option that
    would be silently ignored is refused, saying why."""
    names = [str((e.get("annotations") or {}).get(REF_NAME) or "") for e in entries if isinstance(e, dict)]
    full = [n for n in names if n and not _BARE_TAG.match(n)]
    if full and len(full) == len(names):
        raise ArchiveInvalid(
            f"--image {image} does not apply: the archive names every image itself ({', '.join(full[:3])}"
            f"{', ...' if len(full) > 3 else ''}); import without --image"
        )
    if tag is not None and unnamed != 1:
        tagged = [n for n in names if n and _BARE_TAG.match(n)]
        why = (
            f"{unnamed} entries have no name" if unnamed else f"the archive tags its entries ({', '.join(tagged[:3])})"
        )
        raise ArchiveInvalid(
            f"--image {image}: its tag :{tag} can only name a lone unnamed entry, and {why}; give --image without a tag"
        )


def _target(
    entry: Any,
    staged: Staged,
    store: BlobStore,
    router: Router,
    registries: Mapping[str, str],
    default: ImageReference | None,
    default_tag: str | None,
) -> Target:
    if not isinstance(entry, dict):
        raise ArchiveInvalid("index.json: a manifests entry is not an object")
    try:
        digest = str(Digest.parse(str(entry.get("digest"))))
        ref = _entry_reference(entry.get("annotations") or {}, default, default_tag)
        if ref.digest is not None and str(ref.digest) != digest:
            raise ArchiveInvalid(f"index.json names {ref} for a different digest {digest}")
        route = router.route_image(ref)
    except (DigestInvalid, NameInvalid, TagInvalid, NameUnknown) as exc:
        raise ArchiveInvalid(f"index.json entry {entry.get('digest')}: {exc.message}") from exc
    graph = _Graph(staged, store)
    graph.walk(digest, str(entry.get("mediaType") or ""), entry.get("size"), top=True)
    tag = ref.tag  # with a digest too (name:tag@digest), that digest was checked above
    name = f"{registries.get(route.upstream, route.upstream)}/{route.repository}"
    reference = f"{name}:{tag}" if tag else f"{name}@{digest}"
    return Target(
        route.upstream,
        route.repository,
        reference,
        tag,
        digest,
        tuple(graph.manifests),
        tuple(graph.blobs),
        tuple(graph.notes),
    )


def _entry_reference(annotations: Mapping[str, Any], default: ImageReference | None, tag: str | None) -> ImageReference:
    """The entry's reference; neither tag nor digest set means "import by digest only"."""
    name = str(annotations.get(REF_NAME) or "")
    if name and not _BARE_TAG.match(name):
        return ImageReference.parse(name)  # a full reference (skopeo's oci-archive:FILE:NAME:TAG)
    containerd = str(annotations.get(CONTAINERD_NAME) or "")
    if default is None and containerd:
        return ImageReference.parse(containerd)  # buildkit and ctr: ref.name is the bare tag
    if default is None:
        what = f"is tagged {name!r} but names no repository" if name else "has no name"
        raise ArchiveInvalid(f"an archive entry {what}: pass --image NAME (e.g. --image docker.io/library/app)")
    return ImageReference(default.registry, default.repository, name or tag, None)


class _Graph:
    """Walk one entry's manifests in the archive (or already in the store), checking sizes."""

    def __init__(self, staged: Staged, store: BlobStore) -> None:
        self.staged, self.store = staged, store
        self.manifests: list[tuple[str, ParsedManifest, int]] = []
        self.blobs: list[tuple[str, int]] = []
        self.notes: list[str] = []
        self._seen: set[str] = set()

    def size(self, digest: str) -> int | None:
        found = self.staged.sizes.get(digest)
        return found if found is not None else self.store.size(Digest.parse(digest))

    def walk(self, digest: str, media_type: str, size: Any, *, top: bool = False) -> bool:
        """Add the manifest and its content; False if an index's child is simply absent."""
        if digest in self._seen:
            return True
        actual = self.size(digest)
        if actual is None:
            if top:
                raise ArchiveInvalid(f"manifest {digest} is missing from the archive")
            return False
        if size != actual:
            raise ArchiveInvalid(f"{digest} is {actual} bytes, its descriptor says {size}")
        try:
            parsed = parse_manifest(self._read(digest), media_type or None)
        except ManifestInvalid as exc:
            raise ArchiveInvalid(f"manifest {digest}: {exc.message}") from exc
        self._seen.add(digest)
        for child in parsed.children:
            if parsed.is_index:
                if not self.walk(str(child.digest), child.media_type, child.size):
                    self.notes.append(f"platform {child.platform or child.digest} not in the archive")
            else:
                self._blob(str(child.digest), child.size)
        self.manifests.append((digest, parsed, actual))
        return True

    def _blob(self, digest: str, size: int) -> None:
        actual = self.size(digest)
        if actual is None:
            raise ArchiveInvalid(f"blob {digest} is missing from the archive")
        if actual != size:
            raise ArchiveInvalid(f"blob {digest} is {actual} bytes, its descriptor says {size}")
        if digest not in self._seen:
            self._seen.add(digest)
            self.blobs.append((digest, actual))

    def _read(self, digest: str) -> bytes:
        temp = self.staged.temps.get(digest)
        data = temp.read_bytes() if temp is not None else self.store.read_blocking(Digest.parse(digest))
        if data is None:
            raise ArchiveInvalid(f"manifest {digest} vanished from the cache during import")
        return data


async def commit(target: Target, staged: Staged, store: BlobStore, catalog: CatalogDatabase, checked: float) -> int:
    """Put one image into the cache: its files, then its catalog rows in one transaction;
    returns the bytes newly stored. ``checked`` dates the tag and the proofs (``PINNED``
    unless ``--no-pin``)."""
    written, now, ops = 0, time.time(), list[Op]()
    u, r = target.upstream, target.repository
    for digest, size in target.blobs:
        written += await _place(digest, staged, store)
        ops += [AddBlob(digest, size, now), Prove(u, r, digest, checked)]
    for digest, parsed, size in target.manifests:
        written += await _place(digest, staged, store)
        children = tuple(str(c.digest) for c in parsed.children)
        ops += [AddManifest(u, r, digest, size, parsed.media_type, children, now), Prove(u, r, digest, checked)]
    if target.tag is not None:
        ops.append(SetTag(u, r, target.tag, target.digest, checked))
    await asyncio.to_thread(catalog.write, ops)
    return written


async def _place(key: str, staged: Staged, store: BlobStore) -> int:
    digest = Digest.parse(key)
    temp = staged.temps.pop(key, None)
    if temp is not None:
        await store.commit(temp, digest)
        return staged.sizes[key]
    if store.size(digest) is None:
        raise CacheCorrupt(f"{digest} vanished from the cache during import (evicted meanwhile?): import again")
    return 0
