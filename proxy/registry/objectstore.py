"""The content-addressed blob store in an S3-API bucket, shared by every replica: one object
per digest at ``<prefix>blobs/<alg>/<aa>/<hex>`` (the same layout as the disk store).

An object under a digest key is always the whole, verified blob (``ObjectUpload`` says how);
readers therefore stream it without hashing again. Reads take byte ranges; ``presign`` hands
out time-limited GET URLs for ``redirect: true``; ``scan`` and ``pending_uploads`` /
``abort_stale_uploads`` are for reconcile. The S3 client and why it is aiobotocore:
``proxy.registry.s3client``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from proxy.config.storage import StorageConfig
from proxy.errors import BlobUnknown, DigestInvalid, DigestMismatch, RangeInvalid
from proxy.oci.digest import Digest
from proxy.registry.objectupload import ObjectUpload
from proxy.registry.s3client import StorageRefused, StorageUnavailable, call, is_missing, open_client

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

CHUNK = 1 << 18
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_LIST_PAGE = 1000


@dataclass(frozen=True, slots=True)
class StoredObject:
    digest: Digest
    size: int
    modified: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class PendingUpload:
    key: str
    upload_id: str
    initiated: float  # epoch seconds


class ObjectReader:
    """Bytes ``[start, end)`` of one object as they arrive, each read within the timeout.

    With ``verify`` (whole objects only) the bytes are hashed on the way and the last chunk
    is handed out only after the digest matched, as for downloads from upstream: a reader
    of a tampered object gets a truncated stream and ``DigestMismatch``, never wrong bytes.
    """

    def __init__(
        self, body: Any, *, size: int, start: int, end: int, timeout: float, verify: Digest | None = None
    ) -> None:
        self._body = body
        self.size = size  # the whole object
        self.start = start
        self.end = end
        self._timeout = timeout
        self._verify = verify

    @property
    def length(self) -> int:
        return self.end - self.start

    async def chunks(self, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        digest = self._verify
        hasher = digest.hasher() if digest is not None else None
        received = 0
        while True:
            data = b""
            if received < self.length:
                data = await call("GetObject read", lambda: self._body.read(chunk_size), self._timeout)
                if not data:
                    raise StorageUnavailable(f"object store sent {received} of {self.length} bytes")
                received += len(data)
            if digest is not None and hasher is not None:
                hasher.update(data)
                if received >= self.length and not digest.matches(hasher.hexdigest()):
                    raise DigestMismatch(f"object store content for {digest} does not match its digest")
            if not data:
                return
            yield data

    def close(self) -> None:
        self._body.close()


class ObjectStore:
    def __init__(self, client: S3Client, config: StorageConfig) -> None:
        if config.bucket is None:
            raise ValueError("storage.bucket is required")
        self._client = client
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.part_size = config.part_size
        self.timeout = config.timeout
        self.redirect_ttl = config.redirect_ttl
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    @asynccontextmanager
    async def open(cls, config: StorageConfig, environ: Mapping[str, str] | None = None) -> AsyncIterator[ObjectStore]:
        async with open_client(config, environ) as client:
            store = cls(client, config)
            try:
                yield store
            finally:
                await store.close()

    async def close(self) -> None:
        """Wait for aborts started by cancelled uploads (each is bounded by the timeout)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- keys -------------------------------------------------------------------------------
    def key(self, digest: Digest) -> str:
        return f"{self.prefix}blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def digest_of(self, key: str) -> Digest | None:
        """The digest a blob key stands for; None for keys that are not ours or misshapen."""
        parts = key.removeprefix(self.prefix).split("/") if key.startswith(self.prefix) else []
        if len(parts) != 4 or parts[0] != "blobs" or parts[3][:2] != parts[2]:
            return None
        try:
            return Digest.parse(f"{parts[1]}:{parts[3]}")
        except DigestInvalid:
            return None

    # --- reading ----------------------------------------------------------------------------
    async def check(self) -> None:
        """Readiness: the bucket answers to our keys (raises StorageUnavailable)."""
        await call("HeadBucket", lambda: self._client.head_bucket(Bucket=self.bucket), self.timeout)

    async def size(self, digest: Digest) -> int | None:
        try:
            head = await call(
                "HeadObject", lambda: self._client.head_object(Bucket=self.bucket, Key=self.key(digest)), self.timeout
            )
        except StorageRefused as exc:
            if is_missing(exc):
                return None
            raise
        return int(head["ContentLength"])

    @asynccontextmanager
    async def read(
        self, digest: Digest, start: int = 0, end: int | None = None, *, verify: bool = False
    ) -> AsyncIterator[ObjectReader]:
        """Stream bytes ``[start, end)`` (to the end when ``end`` is None). ``verify`` (whole
        blob only) re-checks the digest on the way: for callers that do not trust the bucket
        as far as their own writes (someone else holding its keys)."""
        if start < 0 or (end is not None and end <= start):
            raise RangeInvalid(f"invalid range {start}-{end}")
        ranged = start > 0 or end is not None
        if verify and ranged:
            raise ValueError("only a whole blob can be verified")
        byte_range = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            answer = await call(
                "GetObject",
                lambda: (
                    self._client.get_object(Bucket=self.bucket, Key=self.key(digest), Range=byte_range)
                    if ranged
                    else self._client.get_object(Bucket=self.bucket, Key=self.key(digest))
                ),
                self.timeout,
            )
        except StorageRefused as exc:
            if is_missing(exc):
                raise BlobUnknown(f"blob {digest} is not in the object store") from exc
            if exc.http_status == 416:
                raise RangeInvalid(f"range {start}-{end} is outside blob {digest}") from exc
            raise
        length = int(answer["ContentLength"])
        first, size = _content_range(answer.get("ContentRange"), length)
        if first != start:
            # A store that ignored Range would hand us bytes from offset 0: never serve them as [start...).
            raise StorageUnavailable(f"object store answered bytes from {first} for a read from {start}")
        reader = ObjectReader(
            answer["Body"], size=size, start=start, end=start + length, timeout=self.timeout,
            verify=digest if verify else None,
        )  # fmt: skip
        try:
            yield reader
        finally:
            reader.close()

    async def presign(self, digest: Digest, ttl: float | None = None) -> str:
        """A GET URL for the blob valid ``ttl`` seconds (default ``redirect_ttl``); no request is made."""
        seconds = int(ttl if ttl is not None else self.redirect_ttl)
        return await call(
            "presign",
            lambda: self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key(digest)}, ExpiresIn=seconds
            ),
            self.timeout,
        )

    # --- writing and removing ---------------------------------------------------------------
    def upload(self, digest: Digest, size: int | None = None) -> ObjectUpload:
        """A verified upload of ``digest`` (``size``, when known, is checked too)."""
        return ObjectUpload(
            self._client, self.bucket, self.key(digest), digest,
            part_size=self.part_size, timeout=self.timeout, expected_size=size, keep=self._keep,
        )  # fmt: skip

    async def delete(self, digest: Digest) -> None:
        """Remove a blob (no error when it is not there: S3 DELETE is idempotent)."""
        await call(
            "DeleteObject", lambda: self._client.delete_object(Bucket=self.bucket, Key=self.key(digest)), self.timeout
        )

    # --- reconcile --------------------------------------------------------------------------
    async def scan(self) -> AsyncIterator[StoredObject]:
        """Every blob in the bucket under our prefix (keys that are not blob keys are skipped)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.prefix}blobs/", "MaxKeys": _LIST_PAGE}
            if token:
                kwargs["ContinuationToken"] = token
            page = await call("ListObjectsV2", partial(self._client.list_objects_v2, **kwargs), self.timeout)
            for item in page.get("Contents", []):
                digest = self.digest_of(item["Key"])
                if digest is not None:
                    yield StoredObject(digest, int(item["Size"]), item["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def pending_uploads(self) -> AsyncIterator[PendingUpload]:
        """Multipart uploads not completed or aborted (running, or left by a killed replica)."""
        markers: dict[str, str] = {}
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.prefix}blobs/", **markers}
            listing = partial(self._client.list_multipart_uploads, **kwargs)
            page = await call("ListMultipartUploads", listing, self.timeout)
            for item in page.get("Uploads", []):
                yield PendingUpload(item["Key"], item["UploadId"], item["Initiated"].timestamp())
            key, upload = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")
            if not page.get("IsTruncated") or not key:
                return
            markers = {"KeyMarker": key, "UploadIdMarker": upload or ""}

    async def abort_stale_uploads(self, older_than: float) -> int:
        """Abort incomplete uploads started more than ``older_than`` seconds ago; returns how many.

        Choose ``older_than`` well above the longest download: a running upload of another
        replica is listed too. (A bucket lifecycle rule AbortIncompleteMultipartUpload does
        the same on stores that support it.)
        """
        cutoff = time.time() - older_than
        stale = [u async for u in self.pending_uploads() if u.initiated <= cutoff]
        for upload in stale:
            abort = partial(
                self._client.abort_multipart_upload, Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
            )
            try:
                await call("AbortMultipartUpload", abort, self.timeout)
            except StorageRefused as exc:
                if not is_missing(exc):  # finished meanwhile
                    raise
        return len(stale)


def _content_range(content_range: str | None, length: int) -> tuple[int, int]:
    """(first byte, object size) from ``Content-Range: bytes a-b/size`` (RFC 9110 14.4);
    ``(0, length)`` for a whole-object answer. Raises StorageUnavailable when malformed."""
    if not content_range:
        return 0, length
    match = _CONTENT_RANGE.match(content_range)
    if match is None:
        raise StorageUnavailable(f"object store sent a malformed Content-Range {content_range[:60]!r}")
    first, last, size = (int(g) for g in match.groups())
    if last - first + 1 != length or last >= size:
        raise StorageUnavailable(f"object store sent Content-Range {content_range!r} for {length} bytes")
    return first, size
