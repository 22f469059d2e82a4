"""The S3 blob store against two real engines (SeaweedFS and Ceph RGW, each test runs on
both): a digest key holds the whole verified blob or nothing — after a digest or size
mismatch, concurrent writers, a cancelled writer or a writer killed with SIGKILL — and no
upload is left behind except the killed one's, which reconcile removes. Reads take ranges;
presigned URLs fetch the blob without our keys and stop working after their TTL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import structlog

from proxy.config.storage import StorageConfig
from proxy.errors import BlobUnknown, DigestMismatch, PullgateError, RangeInvalid
from proxy.oci.digest import Digest
from proxy.registry.objectstore import CHUNK, ObjectStore, _content_range
from proxy.registry.s3client import StorageUnavailable
from tests.conftest import S3_BUCKET
from tests.support import s3uploader
from tests.support.procs import free_port
from tests.support.s3engine import S3Engine

PART = 5 << 20  # the smallest part S3 allows: multipart tests stay small
ROOT = Path(__file__).resolve().parent.parent


def storage_config(engine: S3Engine, prefix: str, **overrides: object) -> StorageConfig:
    config = StorageConfig(
        type="s3", endpoint=engine.endpoint, bucket=S3_BUCKET, prefix=prefix,
        access_key_env="TEST_S3_ACCESS", secret_key_env="TEST_S3_SECRET", part_size=PART, timeout=20.0,
    )  # fmt: skip
    return replace(config, **overrides)  # type: ignore[arg-type]


def engine_env(engine: S3Engine) -> dict[str, str]:
    return {"TEST_S3_ACCESS": engine.keys.access_key, "TEST_S3_SECRET": engine.keys.secret_key}


@asynccontextmanager
async def open_store(engine: S3Engine, prefix: str, **overrides: object) -> AsyncIterator[ObjectStore]:
    async with ObjectStore.open(storage_config(engine, prefix, **overrides), engine_env(engine)) as store:
        yield store


def blob(size: int, seed: int = 0) -> tuple[bytes, Digest]:
    """Bytes that differ at every offset (a lost, doubled or reordered part changes them)."""
    data = random.Random(seed).randbytes(size)
    return data, Digest.of(data)


async def put(store: ObjectStore, data: bytes, digest: Digest, *, size: int | None = None,
              chunk: int = 1 << 20) -> bool:
    async with store.upload(digest, len(data) if size is None else size) as upload:
        for offset in range(0, len(data), chunk):
            await upload.write(data[offset : offset + chunk])
        return await upload.commit()


async def read_all(store: ObjectStore, digest: Digest, start: int = 0, end: int | None = None) -> bytes:
    async with store.read(digest, start, end) as reader:
        return b"".join([chunk async for chunk in reader.chunks()])


async def leftovers(store: ObjectStore) -> tuple[list[str], list[str]]:
    """(blob keys visible, multipart uploads pending) under the store's prefix."""
    objects = [store.key(o.digest) async for o in store.scan()]
    uploads = [u.key async for u in store.pending_uploads()]
    return objects, uploads


# --- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "chunk", "ranges"),
    [
        (0, 1 << 20, []),
        (100_000, 1 << 20, [(0, 1), (99_999, 100_000), (10, 70_000)]),
        (2 * PART + 1234, 1 << 20, [(PART - 10, PART + 10), (2 * PART, 2 * PART + 1234)]),  # across parts
        (6 * PART, 3 << 20, [(5 * PART - 1, 5 * PART + 1)]),  # many parts, writes not aligned to them
        (PART, 64 << 10, [(PART - 1, PART)]),  # exactly one part
    ],
    ids=["empty", "one-put", "multipart", "many-parts", "one-part"],
)
async def test_round_trip_with_ranges(s3_engine: S3Engine, key_prefix: str, size: int, chunk: int,
                                      ranges: list[tuple[int, int]]) -> None:
    data, digest = blob(size)
    async with open_store(s3_engine, key_prefix) as store:
        assert await store.size(digest) is None
        assert await put(store, data, digest, chunk=chunk) is True
        assert await store.size(digest) == size
        assert await read_all(store, digest) == data
        for start, end in ranges:
            async with store.read(digest, start, end) as reader:
                assert (reader.size, reader.start, reader.end) == (size, start, end)
                assert b"".join([c async for c in reader.chunks()]) == data[start:end]
        if size:
            assert await read_all(store, digest, size // 2) == data[size // 2 :]  # open-ended, as Range: bytes=N-
        objects, uploads = await leftovers(store)
        assert objects == [store.key(digest)]
        assert uploads == []
        assert [(o.digest, o.size) async for o in store.scan()] == [(digest, size)]


async def test_storing_again_reports_present_and_keeps_the_object(s3_engine: S3Engine, key_prefix: str) -> None:
    for size in (1000, PART + 1):
        data, digest = blob(size, seed=size)
        async with open_store(s3_engine, key_prefix) as store:
            assert await put(store, data, digest) is True
            assert await put(store, data, digest) is False
            assert await read_all(store, digest) == data
            assert (await leftovers(store))[1] == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [("missing blob", BlobUnknown), ("range past the end", RangeInvalid), ("empty range", RangeInvalid)],
)
async def test_read_errors(s3_engine: S3Engine, key_prefix: str, case: str, expected: type[PullgateError]) -> None:
    data, digest = blob(1000)
    async with open_store(s3_engine, key_prefix) as store:
        if case != "missing blob":
            await put(store, data, digest)
        start, end = {"missing blob": (0, None), "range past the end": (5000, 6000), "empty range": (10, 10)}[case]
        with pytest.raises(expected):
            await read_all(store, digest, start, end)


# --- verified before visible --------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "tamper", "announced"),
    [
        (1000, "flip a byte", None),
        (2 * PART + 7, "flip a byte", None),  # detected after parts were uploaded
        (2 * PART + 7, "drop the tail", None),  # short: digest differs
        (2 * PART + 7, None, 2 * PART + 8),  # right bytes, wrong announced size
        (1000, "append a byte", None),  # longer than announced
    ],
    ids=["small-corrupt", "multipart-corrupt", "multipart-short", "size-mismatch", "too-long"],
)
async def test_mismatch_leaves_nothing_under_the_key(s3_engine: S3Engine, key_prefix: str, size: int,
                                                     tamper: str | None, announced: int | None) -> None:
    data, digest = blob(size)
    sent = {
        None: data,
        "flip a byte": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
        "drop the tail": data[:-100],
        "append a byte": data + b"x",
    }[tamper]
    async with open_store(s3_engine, key_prefix) as store:
        with pytest.raises(DigestMismatch):
            await put(store, sent, digest, size=announced or size)
        assert await store.size(digest) is None
        assert await leftovers(store) == ([], [])


async def test_concurrent_uploads_of_one_digest(s3_engine: S3Engine, key_prefix: str) -> None:
    data, digest = blob(2 * PART + 999, seed=7)
    async with open_store(s3_engine, key_prefix) as store:
        created = await asyncio.gather(*(put(store, data, digest, chunk=256 << 10) for _ in range(4)))
        # SeaweedFS honours If-None-Match on complete (one True); RGW 16 does not, so more than
        # one may replace the object — always with the same verified bytes.
        assert any(created)
        assert await read_all(store, digest) == data
        assert await leftovers(store) == ([store.key(digest)], [])


async def test_cancelled_upload_is_aborted(s3_engine: S3Engine, key_prefix: str) -> None:
    data, digest = blob(3 * PART, seed=3)
    async with open_store(s3_engine, key_prefix) as store:
        started = asyncio.Event()

        async def writer() -> None:
            async with store.upload(digest, len(data)) as upload:
                await upload.write(data[: 2 * PART])
                started.set()
                await asyncio.sleep(60)  # a stalled upstream

        task = asyncio.create_task(writer())
        await asyncio.wait_for(started.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.close()  # the shielded abort has finished
        assert await store.size(digest) is None
        assert await leftovers(store) == ([], [])


async def test_killed_uploader_leaves_no_object_and_reconcile_aborts_its_upload(
    s3_engine: S3Engine, key_prefix: str
) -> None:
    data, digest = blob(4 * PART, seed=9)
    config = storage_config(s3_engine, key_prefix)
    spec = {
        "storage": {k: getattr(config, k) for k in ("type", "endpoint", "bucket", "prefix", "access_key_env",
                                                   "secret_key_env", "part_size", "timeout")},
        "digest": str(digest), "size": len(data), "parts": 2,
    }  # fmt: skip
    env = {**os.environ, **engine_env(s3_engine), "UPLOADER_CONFIG": json.dumps(spec), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.s3uploader", stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
        assert line.decode().strip() == s3uploader.READY
    finally:
        proc.kill()  # SIGKILL: no abort, no cleanup of any kind
        await proc.wait()
    async with open_store(s3_engine, key_prefix) as store:
        assert await store.size(digest) is None
        objects, uploads = await leftovers(store)
        assert objects == []
        assert uploads == [store.key(digest)]  # invisible, but taking space until reconcile
        assert await store.abort_stale_uploads(older_than=3600) == 0  # a running upload looks the same
        assert await store.abort_stale_uploads(older_than=0) == 1
        assert await leftovers(store) == ([], [])


@pytest.mark.parametrize(
    ("size", "plant"),
    [(1000, "flip the last byte"), (3 * CHUNK + 17, "flip the last byte"), (1000, "empty object")],
    ids=["one-chunk", "many-chunks", "empty"],
)
async def test_verified_read_of_a_planted_object_never_yields_the_last_byte(s3_engine: S3Engine, key_prefix: str,
                                                                             size: int, plant: str) -> None:
    """An attacker holding the bucket's keys writes other bytes under a digest key."""
    data, digest = blob(size, seed=11)
    async with open_store(s3_engine, key_prefix) as store:
        planted = b"" if plant == "empty object" else data[:-1] + bytes([data[-1] ^ 0xFF])
        s3_engine.client().put_object(Bucket=S3_BUCKET, Key=store.key(digest), Body=planted)
        received = bytearray()
        with pytest.raises(DigestMismatch):
            async with store.read(digest, verify=True) as reader:
                async for chunk in reader.chunks():
                    received += chunk
        assert len(received) < max(len(planted), 1)
        assert bytes(received) == planted[: len(received)]
        await store.delete(digest)
        assert await store.size(digest) is None
        await store.delete(digest)  # idempotent
        await put(store, data, digest)
        async with store.read(digest, verify=True) as reader:  # the genuine blob passes
            assert b"".join([c async for c in reader.chunks()]) == data
        with pytest.raises(ValueError, match="whole blob"):
            async with store.read(digest, 1, verify=True):
                pass


async def test_hung_store_times_out_and_leaves_nothing_visible(s3_engine: S3Engine, key_prefix: str) -> None:
    data, digest = blob(3 * PART, seed=4)
    async with open_store(s3_engine, key_prefix, timeout=1.0) as store:
        began = time.monotonic()
        try:
            with pytest.raises(StorageUnavailable, match="timed out"), structlog.testing.capture_logs() as logs:
                async with store.upload(digest, len(data)) as upload:
                    await upload.write(data[:PART])  # the multipart upload exists, part 1 is on its way
                    s3_engine.pause()
                    await upload.write(data[PART:])
                    await upload.commit()
            # The abort on the way out hit the same hung store and gave up after its deadline.
            assert time.monotonic() - began < 4 * store.timeout + 3
            assert [e["key"] for e in logs if e["event"] == "object_upload_abort_failed"] == [store.key(digest)]
        finally:
            s3_engine.resume()
        assert await store.size(digest) is None
        assert (await leftovers(store))[0] == []
        await store.abort_stale_uploads(older_than=0)  # reconcile removes what the failed abort left
        assert await leftovers(store) == ([], [])


# --- presigned URLs -----------------------------------------------------------------------
async def test_presigned_url_serves_the_blob_and_expires(s3_engine: S3Engine, key_prefix: str) -> None:
    data, digest = blob(300_000, seed=5)
    async with open_store(s3_engine, key_prefix) as store, aiohttp.ClientSession(trust_env=False) as http:
        await put(store, data, digest)
        url = await store.presign(digest)
        assert s3_engine.keys.secret_key not in url
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == data
        async with http.get(url, headers={"Range": "bytes=100-199"}) as response:  # clients resume with Range
            assert response.status == 206
            assert await response.read() == data[100:200]
        short = await store.presign(digest, ttl=1)
        await asyncio.sleep(2.1)
        async with http.get(short) as response:
            assert response.status == 403


# --- failures -----------------------------------------------------------------------------
async def test_unreachable_store_fails_fast_with_unavailable(key_prefix: str) -> None:
    config = StorageConfig(type="s3", endpoint=f"http://127.0.0.1:{free_port()}", bucket=S3_BUCKET,
                           prefix=key_prefix, timeout=2.0)
    data, digest = blob(10)
    async with ObjectStore.open(config, {}) as store:
        began = time.monotonic()
        for operation in (store.check(), store.size(digest), put(store, data, digest), read_all(store, digest)):
            with pytest.raises(StorageUnavailable):
                await operation
        assert time.monotonic() - began < 4 * config.timeout + 2


async def test_wrong_keys_are_refused(s3_engine: S3Engine, key_prefix: str) -> None:
    env = {**engine_env(s3_engine), "TEST_S3_SECRET": "not-the-secret-key-0123456789"}
    async with ObjectStore.open(storage_config(s3_engine, key_prefix), env) as store:
        with pytest.raises(StorageUnavailable, match="refused"):
            await store.check()


@pytest.mark.parametrize(
    ("content_range", "length", "expected"),
    [
        (None, 10, (0, 10)),
        ("bytes 0-9/10", 10, (0, 10)),
        ("bytes 5-9/100", 5, (5, 100)),
        ("bytes 5-9/100", 6, None),  # length disagrees
        ("bytes 5-100/100", 96, None),  # past the end
        ("bytes */100", 0, None),  # the 416 form
        ("items 0-9/10", 10, None),
    ],
)
def test_content_range_is_checked(content_range: str | None, length: int, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(StorageUnavailable):
            _content_range(content_range, length)
    else:
        assert _content_range(content_range, length) == expected


def test_keys_and_digests_round_trip() -> None:
    store = ObjectStore(object(), StorageConfig(type="s3", bucket="b-1", prefix="cache/"))  # type: ignore[arg-type]
    digest = Digest.of(b"x")
    key = store.key(digest)
    assert key == f"cache/blobs/sha256/{digest.hex[:2]}/{digest.hex}"
    assert store.digest_of(key) == digest
    for foreign in ("other/blobs/sha256/aa/" + "a" * 64, f"cache/blobs/sha256/zz/{digest.hex}",
                    "cache/blobs/md5/aa/aa", "cache/tmp/x", f"cache/blobs/sha256/{digest.hex[:2]}/{digest.hex}/x"):
        assert store.digest_of(foreign) is None
