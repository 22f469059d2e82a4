"""A registry-shaped aiohttp app serving content from memory, with knobs for the faults a
real registry will not produce on demand: corrupted or truncated bytes, garbage manifests,
5xx, throttled transfers. End-to-end behaviour is tested against the real registry
(``tests/support/registry.py``); this one is for the fault paths."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from proxy.config.settings import Config
from tests.support.aio import Client
from tests.support.images import sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass
class Image:
    repository: str
    manifest: bytes
    digest: str
    config: bytes
    layers: list[bytes]

    @property
    def blobs(self) -> dict[str, bytes]:
        return {sha256_digest(b): b for b in [self.config, *self.layers]}


@dataclass
class Origin:
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)  # (repo, ref) -> (type, body)
    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (repo, digest) -> bytes
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, path)
    corrupt: set[str] = field(default_factory=set)  # digests whose bytes get a flipped byte
    truncate: set[str] = field(default_factory=set)  # digests cut off halfway (connection closed)
    status: int | None = None  # answer everything with this status when set
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks of a blob
    answer_delay: float = 0.0  # seconds before a blob GET is answered at all
    lie_about_digest: bool = False  # send a wrong Docker-Content-Digest for manifests

    # --- content ----------------------------------------------------------------------
    def add_image(self, repository: str, tag: str | None, layers: list[int] | None = None, seed: bytes = b"") -> Image:
        layer_bytes = [os.urandom(n) for n in (layers or [1024, 2048])]
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "seed": seed.hex(), "n": os.urandom(4).hex()}
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256_digest(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha256_digest(b),
                        "size": len(b),
                    }
                    for b in layer_bytes
                ],
            }
        ).encode()
        image = Image(repository, manifest, sha256_digest(manifest), config, layer_bytes)
        self.put_manifest(repository, tag, OCI_MANIFEST, manifest)
        for digest, data in image.blobs.items():
            self.blobs[(repository, digest)] = data
        return image

    def add_index(self, repository: str, tag: str, images: dict[str, Image]) -> str:
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": image.digest,
                        "size": len(image.manifest),
                        "platform": {"os": platform.split("/")[0], "architecture": platform.split("/")[1]},
                    }
                    for platform, image in images.items()
                ],
            }
        ).encode()
        self.put_manifest(repository, tag, OCI_INDEX, index)
        return sha256_digest(index)

    def put_manifest(self, repository: str, tag: str | None, media_type: str, body: bytes) -> None:
        self.manifests[(repository, sha256_digest(body))] = (media_type, body)
        if tag is not None:
            self.manifests[(repository, tag)] = (media_type, body)

    def count(self, method: str, fragment: str) -> int:
        return sum(n for (m, path), n in self.requests.items() if m == method and fragment in path)

    # --- the app ----------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self.base)
        app.router.add_get(r"/v2/{name:.+}/manifests/{ref}", self.manifest)
        app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_get(r"/v2/{name:.+}/tags/list", self.tags)
        return app

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def manifest(self, request: web.Request) -> web.Response:
        self.requests[(request.method, request.path)] += 1
        if self.status is not None:
            return web.Response(status=self.status)
        found = self.manifests.get((request.match_info["name"], request.match_info["ref"]))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        media_type, body = found
        digest = sha256_digest(b"lie" + body) if self.lie_about_digest else sha256_digest(body)
        return web.Response(body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.requests[(request.method, request.path)] += 1
        if self.status is not None:
            return web.Response(status=self.status)
        digest = request.match_info["digest"]
        data = self.blobs.get((request.match_info["name"], digest))
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.answer_delay and request.method == "GET":
            await asyncio.sleep(self.answer_delay)
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        )
        response.content_length = len(data)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = data[: len(data) // 2] if digest in self.truncate else data
        for offset in range(0, len(body), 1 << 16):
            await response.write(body[offset : offset + (1 << 16)])
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if digest in self.truncate:
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def tags(self, request: web.Request) -> web.Response:
        self.requests[(request.method, request.path)] += 1
        name = request.match_info["name"]
        tags = sorted(ref for repo, ref in self.manifests if repo == name and ":" not in ref)
        if not tags:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        last, n = request.query.get("last"), int(request.query.get("n", "1000"))
        tags = [t for t in tags if last is None or t > last]
        headers = {}
        if len(tags) > n:
            headers["Link"] = f'</v2/{name}/tags/list?last={tags[n - 1]}&n={n}>; rel="next"'
        return web.json_response({"name": name, "tags": tags[:n]}, headers=headers)


MirrorUnderTest = tuple[Client, "Origin"]
StartMirror = Callable[[Config], Awaitable[MirrorUnderTest]]
