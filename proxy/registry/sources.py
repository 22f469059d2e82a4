"""Where a blob download reads its bytes from: the upstream registry, the shared object
store, or the replica that is downloading it right now (its peer endpoint).

Each source opens at a byte offset, so a download that loses its source mid-way (a peer
killed, the object store gone) goes on from the next one where it stopped: the bytes
already received stay in the flight's file and its running hash. No source is trusted:
the download hashes every byte whatever its origin, and only a matching digest releases
the last byte to clients (``proxy.registry.download``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from proxy.errors import BlobUnknown, PullgateError, UpstreamError
from proxy.oci.digest import Digest
from proxy.registry.download import CHUNK
from proxy.registry.objectstore import ObjectStore
from proxy.registry.routing import Route
from proxy.registry.s3client import StorageUnavailable
from proxy.registry.upstream.client import RegistryClient


class SourceFailed(PullgateError):
    """A shared source (object store, peer) stopped giving bytes: try the next source.
    ``gone``: the source cannot be reached or broke mid-transfer (do not ask it again);
    otherwise it answered but had nothing yet (a peer between two states): ask again."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, message: str, *, gone: bool = True) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(slots=True)
class Body:
    """An open source: the blob's whole size (when known) and its bytes from the offset."""

    size: int | None
    chunks: AsyncIterator[bytes]


class BlobSource(Protocol):
    name: str  # metrics label: upstream, object_store, peer

    def open(self, start: int) -> AbstractAsyncContextManager[Body]: ...


class UpstreamSource:
    """The upstream registry, under the repository of the request that started the download
    (its GET is the proof that the repository holds the blob)."""

    name = "upstream"

    def __init__(self, client: RegistryClient, route: Route, digest: Digest) -> None:
        self._client = client
        self._route = route
        self._digest = digest

    @asynccontextmanager
    async def open(self, start: int) -> AsyncIterator[Body]:
        # Resuming from another source: ask for the rest (RFC 9110 14.2). A registry that
        # ignores Range answers 200 with the whole blob: skip what we have.
        headers = {"Range": f"bytes={start}-"} if start else None
        async with self._client.open("GET", self._route.repository, f"blobs/{self._digest}", headers=headers) as r:
            if r.status == 404:
                raise BlobUnknown(f"blob {self._digest} is unknown to repository {self._route.repository}")
            if r.status not in (200, 206) or (r.status == 206 and not start):
                raise UpstreamError(f"upstream answered {r.status} for blob GET")
            size, skip = _sizes(r, start)
            yield Body(size, _chunks(r, skip))


class ObjectSource:
    """The shared object store (a blob another replica downloaded and verified)."""

    name = "object_store"

    def __init__(self, objects: ObjectStore, digest: Digest) -> None:
        self._objects = objects
        self._digest = digest

    @asynccontextmanager
    async def open(self, start: int) -> AsyncIterator[Body]:
        try:
            async with self._objects.read(self._digest, start) as reader:
                yield Body(reader.size, _object_chunks(reader.chunks()))
        except StorageUnavailable as exc:
            raise SourceFailed(f"object store: {exc.message}") from exc


class PeerSource:
    """Another replica's download of the blob, streamed while it runs (``proxy.http.peerapi``)."""

    name = "peer"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        url: str,
        token: str,
        *,
        timeout: float,
        tls: aiohttp.Fingerprint | bool = True,
    ) -> None:
        self._session = session
        self._tls = tls
        self.base = base  # the holder's advertised URL
        self.url = url
        self._token = token
        self._timeout = timeout

    @asynccontextmanager
    async def open(self, start: int) -> AsyncIterator[Body]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if start:
            headers["Range"] = f"bytes={start}-"
        # Each read has its own deadline (a peer that stops sending is a dead peer); the
        # whole transfer has none: it lasts as long as the holder's download.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=self._timeout)
        try:
            request = self._session.get(
                self.url, headers=headers, timeout=timeout, allow_redirects=False, ssl=self._tls
            )
            async with request as r:
                if r.status not in (200, 206) or (r.status == 206) != bool(start):
                    raise SourceFailed(f"peer answered {r.status}", gone=r.status != 404)
                size, skip = _sizes(r, start)
                yield Body(size, _peer_chunks(r, skip))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceFailed(f"peer {self.url} failed: {exc.__class__.__name__}") from exc


def _sizes(response: aiohttp.ClientResponse, start: int) -> tuple[int | None, int]:
    """(whole blob size, bytes to skip) of a 200 or 206 answer to a read from ``start``."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        first = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
        if not first.isdigit() or int(first) != start:
            raise SourceFailed(f"answered bytes from {first!r} for a read from {start}")
        return (int(total) if total.isdigit() else None), 0
    return response.content_length, start


async def _chunks(response: aiohttp.ClientResponse, skip: int) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_chunked(CHUNK):
        if skip:
            if len(chunk) <= skip:
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
        yield chunk


async def _object_chunks(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except StorageUnavailable as exc:
        raise SourceFailed(f"object store: {exc.message}") from exc


async def _peer_chunks(response: aiohttp.ClientResponse, skip: int) -> AsyncIterator[bytes]:
    try:
        async for chunk in _chunks(response, skip):
            yield chunk
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise SourceFailed(f"peer transfer failed: {exc.__class__.__name__}") from exc
