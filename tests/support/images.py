"""Build OCI image layouts on disk for the real clients (skopeo, containerd) to push and pull.

Layout format: https://github.com/opencontainers/image-spec/blob/main/image-layout.md
(``oci-layout``, ``index.json`` naming tags with ``org.opencontainers.image.ref.name``,
``blobs/sha256/<hex>``). Manifests, configs and indexes follow the image spec
(manifest.md, config.md, image-index.md); ``schema="docker"`` writes the Docker schema2
media types instead, which registries and clients treat as the same structure.

Layers are real gzip'd tar streams of pseudo-random bytes, so every test image has unique
blobs unless a ``seed`` is given. The random stream is AES-CTR keystream (fast: ~1 GB/s) and
gzip runs at level 0 (stored blocks: random data does not compress, and it keeps a 64 MiB
layer well under a second). Blobs are streamed to disk, never held whole in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_INDEX = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

Schema = Literal["oci", "docker"]
# A layer is either the size of one file of random bytes, or explicit {path: content}.
LayerSpec = int | Mapping[str, bytes]

_MEDIA_TYPES: dict[Schema, dict[str, str]] = {
    "oci": {"manifest": OCI_MANIFEST, "index": OCI_INDEX, "config": OCI_CONFIG,
            "layer": OCI_LAYER_GZIP},
    "docker": {"manifest": DOCKER_MANIFEST, "index": DOCKER_INDEX, "config": DOCKER_CONFIG,
               "layer": DOCKER_LAYER_GZIP},
}
_DEFAULT_CREATED = "2024-01-01T00:00:00Z"
_DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
_CHUNK = 1 << 20


def canonical_json(value: Any) -> bytes:
    """Compact JSON; the bytes are what gets hashed, so every caller must use the same form."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor (image-spec descriptor.md)."""

    media_type: str
    digest: str
    size: int
    platform: Mapping[str, str] | None = None
    annotations: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``build_image`` wrote: enough to compare against what a client pulled."""

    layout: Path
    tag: str | None
    platform: str
    media_type: str
    manifest_digest: str
    manifest_bytes: bytes
    config_digest: str
    config_bytes: bytes
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config and layers: the blobs a client GETs after the manifest."""
        return (self.config_digest, *self.layer_digests)

    @property
    def all_digests(self) -> tuple[str, ...]:
        return (self.manifest_digest, *self.blob_digests)

    @property
    def total_size(self) -> int:
        return len(self.manifest_bytes) + len(self.config_bytes) + sum(self.layer_sizes)

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.manifest_digest, len(self.manifest_bytes),
                          platform=parse_platform(self.platform))


@dataclass(frozen=True, slots=True)
class IndexInfo:
    """What ``build_index`` wrote; ``images`` maps "os/arch[/variant]" to each image."""

    layout: Path
    tag: str | None
    media_type: str
    index_digest: str
    index_bytes: bytes
    images: Mapping[str, ImageInfo] = field(default_factory=dict)

    @property
    def all_digests(self) -> tuple[str, ...]:
        digests = [self.index_digest]
        for image in self.images.values():
            digests.extend(image.all_digests)
        return tuple(digests)


def parse_platform(text: str) -> dict[str, str]:
    """"linux/arm64/v8" -> {"os": "linux", "architecture": "arm64", "variant": "v8"}."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], got {text!r}")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


class OciLayout:
    """An image-layout directory: blobs by digest plus tagged entries in ``index.json``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout_file = self.root / "oci-layout"
        if not layout_file.exists():
            layout_file.write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not self.index_path.exists():
            self._write_index([])

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algorithm / hexpart

    def write_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return Descriptor(media_type, digest, len(data))

    def write_json(self, value: Mapping[str, Any], media_type: str) -> tuple[Descriptor, bytes]:
        data = canonical_json(value)
        return self.write_blob(data, media_type), data

    def tag(self, descriptor: Descriptor, tag: str) -> None:
        """Name ``descriptor`` as ``tag`` in index.json, replacing an older entry of that tag."""
        entries = [m for m in self.manifests() if m.get("annotations", {}).get(REF_NAME) != tag]
        annotations = {**(descriptor.annotations or {}), REF_NAME: tag}
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size,
                           descriptor.platform, annotations)
        entries.append(entry.to_json())
        self._write_index(entries)

    def manifests(self) -> list[dict[str, Any]]:
        index = json.loads(self.index_path.read_bytes())
        manifests: list[dict[str, Any]] = index.get("manifests", [])
        return manifests

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        data = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                               "manifests": manifests})
        tmp = self.index_path.with_name("index.json.tmp")
        tmp.write_bytes(data)
        tmp.replace(self.index_path)

    def write_layer(self, spec: LayerSpec, *, key: bytes, name: str, media_type: str,
                    compresslevel: int = 0) -> tuple[Descriptor, str]:
        """Stream one tar layer into the layout; returns (descriptor, diff_id)."""
        tmp = self.root / "blobs" / f"{name}.partial"
        with tmp.open("wb") as raw:
            blob = _HashingWriter(raw)
            if media_type == OCI_LAYER_TAR:
                diff = blob
                _write_tar(diff, spec, key, name)
            else:
                with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=compresslevel,
                                   mtime=0) as gz:
                    diff = _HashingWriter(gz)
                    _write_tar(diff, spec, key, name)
        digest = "sha256:" + blob.hasher.hexdigest()
        tmp.replace(self.blob_path(digest))
        return Descriptor(media_type, digest, blob.size), "sha256:" + diff.hasher.hexdigest()


    def tagged(self, tag: str) -> dict[str, Any]:
        for entry in self.manifests():
            if entry.get("annotations", {}).get(REF_NAME) == tag:
                return entry
        raise KeyError(f"no manifest tagged {tag!r} in {self.index_path}")

    def export_dir(self, tag: str, dest: Path) -> Path:
        """Copy the tagged image (or index and its images) into skopeo's ``dir:`` format.

        skopeo 1.9 reads only OCI media types from an ``oci:`` layout's index.json, so
        Docker schema2 images are pushed from this form instead; blobs are hard links.
        """
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "version").write_text("Directory Transport Version: 1.1\n")
        top = self.tagged(tag)
        self._link(top["digest"], dest / "manifest.json")
        manifest = json.loads(self.blob_path(top["digest"]).read_bytes())
        children = [m["digest"] for m in manifest.get("manifests", [])]
        for child in children:
            self._link(child, dest / f"{child.partition(':')[2]}.manifest.json")
        for digest in children or [top["digest"]]:
            image = json.loads(self.blob_path(digest).read_bytes())
            for blob in [image["config"], *image["layers"]]:
                self._link(blob["digest"], dest / blob["digest"].partition(":")[2])
        return dest

    def _link(self, digest: str, target: Path) -> None:
        if not target.exists():
            os.link(self.blob_path(digest), target)


class _HashingWriter(io.RawIOBase):
    """Counts and hashes bytes on their way to ``target`` (diff_id / digest in one pass)."""

    def __init__(self, target: BinaryIO | gzip.GzipFile) -> None:
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        self.size += view.nbytes
        self.target.write(view)
        return view.nbytes


class _RandomReader(io.RawIOBase):
    """``size`` bytes of AES-CTR keystream: seeded-deterministic and fast."""

    def __init__(self, size: int, key: bytes) -> None:
        self.remaining = size
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self.remaining if size < 0 else min(size, self.remaining)
        self.remaining -= n
        return self._cipher.update(bytes(n))


def _write_tar(out: _HashingWriter, spec: LayerSpec, key: bytes, name: str) -> None:
    files: Mapping[str, bytes | int] = {f"{name}.bin": spec} if isinstance(spec, int) else spec
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      bufsize=_CHUNK) as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.mode = 0o644
            info.mtime = 0
            if isinstance(content, int):
                info.size = content
                tar.addfile(info, _RandomReader(content, key))
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def _layer_key(seed: int | str | None, label: str) -> bytes:
    if seed is None:
        return os.urandom(32)
    return hashlib.sha256(f"{seed}/{label}".encode()).digest()


def _history(history: Sequence[str | Mapping[str, Any]] | None, layer_count: int,
             created: str) -> list[dict[str, Any]]:
    if history is None:
        history = [f"/bin/sh -c #(nop) ADD file:layer{i} in / " for i in range(layer_count)]
    return [{"created": created, "created_by": h} if isinstance(h, str) else dict(h)
            for h in history]


def build_image(layout_dir: Path | str, tag: str | None = "latest", *,
                layers: Sequence[LayerSpec] = (1024, 2048), seed: int | str | None = None,
                platform: str = "linux/amd64", user: str | None = None,
                env: Sequence[str] = _DEFAULT_ENV, cmd: Sequence[str] | None = None,
                labels: Mapping[str, str] | None = None,
                history: Sequence[str | Mapping[str, Any]] | None = None,
                created: str = _DEFAULT_CREATED, config_extra: Mapping[str, Any] | None = None,
                annotations: Mapping[str, str] | None = None, schema: Schema = "oci",
                compress: bool = True, compresslevel: int = 0) -> ImageInfo:
    """Write one image (config, layers, manifest) into ``layout_dir`` and tag it.

    ``config_extra`` is merged into the config's ``config`` object (ExposedPorts, Entrypoint,
    WorkingDir ...). ``tag=None`` writes the image without naming it (for indexes).
    """
    layout = OciLayout(layout_dir)
    types = _MEDIA_TYPES[schema]
    layer_type = types["layer"] if compress else OCI_LAYER_TAR
    label = platform  # not the tag: one seed gives the same blobs under any tag
    written = [layout.write_layer(spec, key=_layer_key(seed, f"{label}/{i}"),
                                  name=f"layer{i}", media_type=layer_type,
                                  compresslevel=compresslevel)
               for i, spec in enumerate(layers)]
    exec_config: dict[str, Any] = {"Env": list(env)}
    if user is not None:
        exec_config["User"] = user
    if cmd is not None:
        exec_config["Cmd"] = list(cmd)
    if labels:
        exec_config["Labels"] = dict(labels)
    exec_config.update(config_extra or {})
    config = {"created": created, **parse_platform(platform), "config": exec_config,
              "rootfs": {"type": "layers", "diff_ids": [d for _, d in written]},
              "history": _history(history, len(written), created)}
    config_desc, config_bytes = layout.write_json(config, types["config"])
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": types["manifest"],
                                "config": config_desc.to_json(),
                                "layers": [desc.to_json() for desc, _ in written]}
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_desc, manifest_bytes = layout.write_json(manifest, types["manifest"])
    if tag is not None:
        layout.tag(manifest_desc, tag)
    return ImageInfo(
        layout=layout.root, tag=tag, platform=platform, media_type=types["manifest"],
        manifest_digest=manifest_desc.digest, manifest_bytes=manifest_bytes,
        config_digest=config_desc.digest, config_bytes=config_bytes,
        layer_digests=tuple(d.digest for d, _ in written),
        layer_sizes=tuple(d.size for d, _ in written),
        diff_ids=tuple(diff for _, diff in written))


def build_index(layout_dir: Path | str, tag: str | None = "latest", *,
                platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
                layers: Sequence[LayerSpec] = (1024, 2048), seed: int | str | None = None,
                annotations: Mapping[str, str] | None = None, schema: Schema = "oci",
                labels: Mapping[str, str] | None = None,
                created: str = _DEFAULT_CREATED) -> IndexInfo:
    """Write a multi-platform index: one distinct image per platform, then the index."""
    layout = OciLayout(layout_dir)
    types = _MEDIA_TYPES[schema]
    images = {p: build_image(layout.root, None, layers=layers, platform=p, schema=schema,
                             seed=seed,
                             labels=labels, created=created)
              for p in platforms}
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": types["index"],
                             "manifests": [i.descriptor().to_json() for i in images.values()]}
    if annotations:
        index["annotations"] = dict(annotations)
    index_desc, index_bytes = layout.write_json(index, types["index"])
    if tag is not None:
        layout.tag(index_desc, tag)
    return IndexInfo(layout=layout.root, tag=tag, media_type=types["index"],
                     index_digest=index_desc.digest, index_bytes=index_bytes, images=images)


class ImageFactory:
    """Builds each image or index into its own fresh layout under ``base`` (test fixture)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._count = 0

    def _layout(self) -> Path:
        self._count += 1
        return self.base / f"layout-{self._count}"

    def image(self, tag: str = "latest", **options: Any) -> ImageInfo:
        """``build_image`` keyword options (layers, seed, user, env, schema, ...)."""
        return build_image(self._layout(), tag, **options)

    def index(self, tag: str = "latest", **options: Any) -> IndexInfo:
        """``build_index`` keyword options (platforms, layers, seed, schema, ...)."""
        return build_index(self._layout(), tag, **options)


def assert_layout_matches(copy: Path, image: ImageInfo) -> None:
    """Every blob of ``image`` (manifests, config, layers) arrived byte for byte in the OCI
    layout at ``copy`` (what ``skopeo copy ... oci:DIR`` wrote)."""
    pulled, source = OciLayout(copy), OciLayout(image.layout)
    for digest in image.all_digests:
        assert pulled.blob_path(digest).read_bytes() == source.blob_path(digest).read_bytes()
