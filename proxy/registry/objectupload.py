"""One blob written into the object store under its digest key, visible only once verified.

Bytes are hashed as they are written. Up to one part they stay in memory; a blob that
fits is checked, then stored with a single conditional PutObject (``If-None-Match: *``).
A larger blob becomes a multipart upload *under its final key*: uploaded parts are not an
object (GET, HEAD and LIST do not see them) until CompleteMultipartUpload, which is sent
only after the last byte arrived and the digest and size matched
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/mpuoverview.html). So a digest key
holds either nothing or the whole verified blob: a mismatch, an error, a timeout or a
cancellation aborts the upload, and a replica killed mid-upload leaves only an invisible
incomplete upload, which ``ObjectStore.abort_stale_uploads`` (reconcile) removes.

Two replicas storing the same blob: the loser's conditional complete answers 412 (AWS,
SeaweedFS) and is aborted. Ceph RGW 16 does not honour ``If-None-Match`` on
CompleteMultipartUpload, so we HEAD first; in the remaining race the later complete
replaces the object atomically with the same verified bytes, never with others.

Each part carries ``Content-MD5`` (the store refuses a part that arrived different) and at
most ``MAX_INFLIGHT`` parts upload at once while the next fills: a slow store slows the
writer down (back-pressure) instead of growing memory; one upload holds at most
``(MAX_INFLIGHT + 1) * part_size`` bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from proxy.errors import DigestMismatch
from proxy.oci.digest import Digest
from proxy.registry.s3client import StorageRefused, StorageUnavailable, call, content_md5, is_precondition_failed

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

MAX_INFLIGHT = 2
MAX_PARTS = 10_000  # S3's limit per multipart upload


class ObjectUpload:
    """``async with store.upload(digest, size) as up: await up.write(b); await up.commit()``.

    Leaving the block without ``commit`` (or with an exception) aborts; ``commit`` returns
    True when this upload created the object, False when it was already there.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        digest: Digest,
        *,
        part_size: int,
        timeout: float,
        expected_size: int | None = None,
        keep: Callable[[asyncio.Task[None]], None] = lambda task: None,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self.key = key
        self.digest = digest
        self.expected_size = expected_size
        self._timeout = timeout
        # Big blobs get bigger parts: S3 allows 10,000 per upload.
        self._part_size = max(part_size, -(-(expected_size or 0) // MAX_PARTS))
        self._keep = keep  # holds abort tasks that must outlive a cancelled caller
        self._hasher = digest.hasher()
        self._buffer = bytearray()
        self.size = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []  # uploaded, in any order
        self._sent: list[int] = []  # size of each part handed to the store, by part number - 1
        self._inflight: list[asyncio.Task[None]] = []
        self._finished = False  # committed or aborted: no more writes

    @property
    def uploaded_parts(self) -> int:
        return len(self._parts)

    # --- writing ----------------------------------------------------------------------------
    async def write(self, data: bytes | memoryview) -> None:
        if self._finished:
            raise RuntimeError("write after commit or abort")
        self._hasher.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise DigestMismatch(f"{self.digest}: more than the announced {self.expected_size} bytes")
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            with memoryview(self._buffer) as view:  # one copy of the part, not two
                part = bytes(view[: self._part_size])
            del self._buffer[: self._part_size]
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            created = await call(
                "CreateMultipartUpload",
                lambda: self._client.create_multipart_upload(Bucket=self._bucket, Key=self.key),
                self._timeout,
            )
            self._upload_id = created["UploadId"]
        while len(self._inflight) >= MAX_INFLIGHT:
            await self._inflight.pop(0)  # raises that part's error
        self._sent.append(len(part))
        number = len(self._sent)
        if number > MAX_PARTS:
            raise DigestMismatch(f"{self.digest}: larger than {MAX_PARTS} parts of {self._part_size} bytes")
        self._inflight.append(asyncio.create_task(self._upload_part(self._upload_id, number, part)))

    async def _upload_part(self, upload_id: str, number: int, part: bytes) -> None:
        md5 = await content_md5(part)
        answer = await call(
            "UploadPart",
            lambda: self._client.upload_part(
                Bucket=self._bucket, Key=self.key, UploadId=upload_id, PartNumber=number, Body=part, ContentMD5=md5
            ),
            self._timeout,
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    # --- finishing --------------------------------------------------------------------------
    async def commit(self) -> bool:
        """Verify, then make the object visible; True if this upload created it."""
        if self._finished:
            raise RuntimeError("commit after commit or abort")
        self._verify()
        if self._upload_id is None:
            created = await self._put_whole(bytes(self._buffer))
        else:
            if self._buffer:
                await self._send(bytes(self._buffer))
            self._buffer.clear()
            while self._inflight:
                await self._inflight.pop(0)
            created = await self._complete(self._upload_id)
        self._finished = True
        return created

    def _verify(self) -> None:
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(f"{self.digest}: got {self.size} of {self.expected_size} bytes")
        if not self.digest.matches(self._hasher.hexdigest()):
            raise DigestMismatch(f"content does not match its digest {self.digest}")

    async def _put_whole(self, data: bytes) -> bool:
        md5 = await content_md5(data)
        try:
            await call(
                "PutObject",
                lambda: self._client.put_object(
                    Bucket=self._bucket, Key=self.key, Body=data, ContentMD5=md5, IfNoneMatch="*"
                ),
                self._timeout,
            )
        except StorageRefused as exc:
            if is_precondition_failed(exc):
                return False  # another writer stored the same verified bytes first
            raise
        return True

    def _check_parts(self) -> list[CompletedPartTypeDef]:
        """The parts in order, checked to assemble exactly the verified stream: numbers 1..N
        each once (S3 concatenates by number), sizes adding up to what was hashed."""
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])
        if [p["PartNumber"] for p in parts] != list(range(1, len(self._sent) + 1)) or sum(self._sent) != self.size:
            raise StorageUnavailable(f"multipart bookkeeping for {self.digest} is inconsistent: not completing")
        return parts

    async def _complete(self, upload_id: str) -> bool:
        parts = self._check_parts()
        if await self._exists():
            await self.abort()
            return False
        try:
            await call(
                "CompleteMultipartUpload",
                lambda: self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self.key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
                self._timeout,
            )
        except StorageRefused as exc:
            if not is_precondition_failed(exc):
                raise
            await self.abort()  # SeaweedFS keeps the upload after a 412
            return False
        self._upload_id = None
        return True

    async def _exists(self) -> bool:
        try:
            await call("HeadObject", lambda: self._client.head_object(Bucket=self._bucket, Key=self.key), self._timeout)
        except StorageRefused as exc:
            if exc.http_status == 404:
                return False
            raise
        return True

    async def abort(self) -> None:
        """Cancel part uploads and abort the multipart upload (idempotent)."""
        self._finished = True
        inflight, self._inflight = self._inflight, []
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            await call(
                "AbortMultipartUpload",
                lambda: self._client.abort_multipart_upload(Bucket=self._bucket, Key=self.key, UploadId=upload_id),
                self._timeout,
            )

    async def __aenter__(self) -> ObjectUpload:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._upload_id is None and not self._inflight:
            self._finished = True
            return
        # Shielded: a cancelled caller (client gone, shutdown) must still not leave parts behind.
        task = asyncio.create_task(self._abort_quietly())
        self._keep(task)
        await asyncio.shield(task)

    async def _abort_quietly(self) -> None:
        try:
            await self.abort()
        except StorageUnavailable as exc:
            # Invisible either way; reconcile (abort_stale_uploads) removes what is left.
            log = structlog.get_logger("pullgate.objectstore")
            log.warning("object_upload_abort_failed", key=self.key, error=exc.message)
