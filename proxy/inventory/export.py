"""``pullgate export``: cached images as an OCI image-layout tarball
(https://github.com/opencontainers/image-spec/blob/main/image-layout.md), the format of
``skopeo copy ... oci-archive:FILE`` and ``podman save --format oci-archive``; the format's
names and errors, shared with ``proxy.inventory.imports``.

The archive holds ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``; each image is an
``index.json`` entry named with its full reference in ``org.opencontainers.image.ref.name``
(what skopeo's ``oci-archive:FILE:REF`` and podman read) and ``io.containerd.image.name``
(``ctr import``). Indexes go whole (every cached platform), with the image's cosign
signature/attestation tags and referrers when the cache holds them.

Blobs stream from the store in 1 MiB chunks, hashed on the way (a damaged cache is not
exported): memory does not grow with image size. A file is written beside its target and
renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import tarfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from proxy.errors import PullgateError
from proxy.inventory.images import Image, ImageNotCached, Inventory
from proxy.oci.digest import Digest
from proxy.oci.reference import ImageReference
from proxy.ops.progress import Task
from proxy.registry.store import BlobStore

CHUNK = 1 << 20
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


class ArchiveInvalid(PullgateError):
    """A tarball that is corrupt, truncated, not an OCI layout, or names its images badly."""

    code, status = "MANIFEST_INVALID", 400


class ExportFailed(PullgateError):
    """The archive could not be written (no such directory, disk full, permissions)."""

    code, status = "UNKNOWN", 500


class CacheCorrupt(PullgateError):
    """A cached object that no longer matches its digest or vanished while being read."""

    code, status = "BLOB_UNKNOWN", 500


# --- export ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entry:
    """One ``index.json`` entry."""

    media_type: str
    digest: str
    size: int
    name: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.name:
            out["annotations"] = {REF_NAME: self.name, CONTAINERD_NAME: self.name}
        return out


@dataclass(slots=True)
class ExportPlan:
    entries: list[Entry] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)  # every object to write, once
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.blobs.values())

    def index_json(self) -> bytes:
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [e.to_json() for e in self.entries],
        }
        return json.dumps(index, separators=(",", ":")).encode()


def plan_export(
    inventory: Inventory, references: Sequence[str], *, partial: bool = False, attachments: bool = True
) -> ExportPlan:
    """What to write for ``references`` (each must be cached, else ``ImageNotCached``)."""
    plan = ExportPlan()
    for text in references:
        image = inventory.locate(text)
        ref = ImageReference.parse(text)
        _plan_image(inventory, plan, image, [ref.tag] if ref.digest is None and ref.tag else [], partial)
        for extra in inventory.attachments(image) if attachments else []:
            try:
                _plan_image(inventory, plan, extra, list(extra.tags), partial=False)
            except ImageNotCached as exc:
                plan.notes.append(f"attachment skipped: {exc.message}")
    return plan


def _plan_image(inventory: Inventory, plan: ExportPlan, image: Image, tags: list[str], partial: bool) -> None:
    snap = inventory.snap
    objects = [image.digest]
    parsed = inventory.manifest(image.digest)
    if parsed is None:
        raise ImageNotCached(f"image not cached: {image.reference()}")
    children = [str(c.digest) for c in parsed.children] if parsed.is_index else []
    for child in children:
        members = snap.closure([child])
        if all(d in snap.sizes for d in members):
            objects.extend(sorted(members))
        elif not partial:
            raise ImageNotCached(
                f"{image.reference()}: platform manifest {child} is not fully cached "
                f"(run 'pullgate warm {image.reference()}', or export with --partial)"
            )
        else:
            plan.notes.append(f"{image.reference()}: {child} not cached, left out")
    if not parsed.is_index:
        members = snap.closure([image.digest])
        missing = [d for d in members if d not in snap.sizes]
        if missing:
            raise ImageNotCached(f"{image.reference()}: {len(missing)} blob(s) not cached, e.g. {missing[0]}")
        objects.extend(sorted(members))
    for digest in objects:
        plan.blobs.setdefault(digest, snap.sizes[digest])
    names = [image.reference(t) for t in tags] or [f"{image.name}@{image.digest}"]
    for name in names:
        entry = Entry(image.media_type, image.digest, snap.sizes[image.digest], name)
        if entry not in plan.entries:
            plan.entries.append(entry)


def write_archive(store: BlobStore, plan: ExportPlan, out: IO[bytes], task: Task | None = None) -> None:
    """Stream the layout as a tar to ``out``, verifying each object's digest as it is read."""
    tar = _TarWriter(out)
    tar.add("oci-layout", LAYOUT)
    tar.add("index.json", plan.index_json())
    for name in ["blobs", *sorted({f"blobs/{d.partition(':')[0]}" for d in plan.blobs})]:
        tar.directory(name)
    for digest, size in plan.blobs.items():
        _add_blob(tar, store, Digest.parse(digest), size, task)
    tar.close()


def _add_blob(tar: _TarWriter, store: BlobStore, digest: Digest, size: int, task: Task | None) -> None:
    try:
        source = store.path(digest).open("rb", buffering=0)
    except FileNotFoundError:
        raise CacheCorrupt(f"{digest} vanished from the cache (evicted meanwhile?): export again") from None
    hasher = digest.hasher()
    with source:
        if os.fstat(source.fileno()).st_size != size:
            raise CacheCorrupt(f"cached {digest} has the wrong size: the cache is damaged")
        tar.header(f"blobs/{digest.algorithm}/{digest.hex}", size)
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
            tar.write(chunk)
            if task is not None:
                task.advance(len(chunk))
        tar.pad()
    if not digest.matches(hasher.hexdigest()):
        raise CacheCorrupt(f"cached {digest} does not match its digest: the cache is damaged")


class _TarWriter:
    """The little of tar that export needs, written straight to ``out`` (a file or a pipe):
    POSIX pax headers from ``tarfile.TarInfo``, data, padding, the end-of-archive blocks."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.offset = 0

    def header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mode = size, kind, 0o755 if kind == tarfile.DIRTYPE else 0o644
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add(self, name: str, data: bytes) -> None:
        self.header(name, len(data))
        self.write(data)
        self.pad()

    def directory(self, name: str) -> None:
        self.header(name, 0, tarfile.DIRTYPE)

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def pad(self, unit: int = tarfile.BLOCKSIZE) -> None:
        if self.offset % unit:
            self.write(bytes(unit - self.offset % unit))

    def close(self) -> None:
        self.write(bytes(2 * tarfile.BLOCKSIZE))
        self.pad(tarfile.RECORDSIZE)


def export_to_file(store: BlobStore, plan: ExportPlan, target: Path, task: Task | None = None) -> None:
    """Write the archive next to ``target`` and rename it into place once complete. Errors
    name ``target`` (the user's path), never the hidden temp file."""
    if target.is_dir():
        raise ExportFailed(f"cannot write {target}: it is a directory")
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with temp.open("wb") as out:
            write_archive(store, plan, out, task)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except OSError as exc:
        raise ExportFailed(f"cannot write {target}: {_why(exc, target)}") from exc
    finally:
        temp.unlink(missing_ok=True)


def _why(exc: OSError, target: Path) -> str:
    if isinstance(exc, FileNotFoundError) and not target.parent.is_dir():
        return f"no directory {target.parent}"
    return exc.strerror or str(exc)
