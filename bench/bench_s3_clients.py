#!/usr/bin/env python3
"""The S3 client decision, reproducible: pullgate's ``ObjectStore`` (aiobotocore) against
obstore, on real SeaweedFS and Ceph RGW started here (tests/support), all on 127.0.0.1.

Per engine and client, ``--rounds`` times, one blob of ``--size`` MiB written and read back
whole: the clients alone (aiobotocore: multipart, 8 MiB parts one after the other; obstore:
``put_async`` of an async iterator, 8 MiB chunks, one in flight), and pullgate's
``ObjectStore`` on aiobotocore as the mirror will use it (1 MiB writes hashed for the digest
check, parts with Content-MD5, two in flight, conditional complete). Reports MiB/s, this
process's CPU seconds, and the longest event-loop stall seen by a 5 ms ticker.

obstore is not a pullgate dependency: ``pip install obstore`` to include it. Numbers of one
run are in proxy/registry/s3client.py's docstring; loopback on a small machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.config.storage import StorageConfig  # noqa: E402
from proxy.oci.digest import Digest  # noqa: E402
from proxy.registry.objectstore import ObjectStore  # noqa: E402
from proxy.registry.s3client import open_client  # noqa: E402
from tests.support.radosgw import RadosGateway  # noqa: E402
from tests.support.s3engine import S3Engine  # noqa: E402
from tests.support.seaweedfs import SeaweedFS  # noqa: E402

BUCKET = "bench"
MIB = 1 << 20
PART = 8 * MIB


class LoopStall:
    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - began - 0.005)


Round = Callable[[bytes, Digest, str], Awaitable[tuple[float, float]]]


def _env(engine: S3Engine) -> dict[str, str]:
    return {"A": engine.keys.access_key, "S": engine.keys.secret_key}


def _config(engine: S3Engine) -> StorageConfig:
    return StorageConfig(type="s3", endpoint=engine.endpoint, bucket=BUCKET, prefix="bench/",
                         access_key_env="A", secret_key_env="S", part_size=PART)


@asynccontextmanager
async def pullgate_client(engine: S3Engine) -> AsyncIterator[Round]:
    async with ObjectStore.open(_config(engine), _env(engine)) as store:

        async def round_(data: bytes, digest: Digest, key: str) -> tuple[float, float]:
            began = time.perf_counter()
            async with store.upload(digest, len(data)) as upload:
                for offset in range(0, len(data), MIB):
                    await upload.write(data[offset : offset + MIB])
                await upload.commit()
            put = time.perf_counter() - began
            began = time.perf_counter()
            received = 0
            async with store.read(digest) as reader:
                async for chunk in reader.chunks(MIB):
                    received += len(chunk)
            assert received == len(data)
            return put, time.perf_counter() - began

        yield round_


@asynccontextmanager
async def aiobotocore_client(engine: S3Engine) -> AsyncIterator[Round]:
    """The client alone, as obstore is measured: sequential parts, no digest, no Content-MD5."""
    async with open_client(_config(engine), _env(engine)) as client:

        async def round_(data: bytes, digest: Digest, key: str) -> tuple[float, float]:
            name = f"{key}/{digest.hex}"
            began = time.perf_counter()
            upload = await client.create_multipart_upload(Bucket=BUCKET, Key=name)
            parts: list[Any] = []
            for number, offset in enumerate(range(0, len(data), PART), start=1):
                answer = await client.upload_part(Bucket=BUCKET, Key=name, UploadId=upload["UploadId"],
                                                  PartNumber=number, Body=data[offset : offset + PART])
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            await client.complete_multipart_upload(Bucket=BUCKET, Key=name, UploadId=upload["UploadId"],
                                                   MultipartUpload={"Parts": parts})
            put = time.perf_counter() - began
            began = time.perf_counter()
            response = await client.get_object(Bucket=BUCKET, Key=name)
            received = 0
            async for chunk in response["Body"].iter_chunks(MIB):
                received += len(chunk)
            assert received == len(data)
            return put, time.perf_counter() - began

        yield round_


@asynccontextmanager
async def obstore_client(engine: S3Engine) -> AsyncIterator[Round]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=engine.endpoint, access_key_id=engine.keys.access_key,
                    secret_access_key=engine.keys.secret_key, region="us-east-1",
                    virtual_hosted_style_request=False, client_options={"allow_http": True})

    async def round_(data: bytes, digest: Digest, key: str) -> tuple[float, float]:
        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(data), MIB):
                yield data[offset : offset + MIB]

        began = time.perf_counter()
        await obstore.put_async(store, f"{key}/{digest.hex}", chunks(), chunk_size=PART, max_concurrency=1)
        put = time.perf_counter() - began
        began = time.perf_counter()
        answer = await obstore.get_async(store, f"{key}/{digest.hex}")
        received = 0
        async for chunk in answer.stream(min_chunk_size=MIB):
            received += len(memoryview(chunk))
        assert received == len(data)
        return put, time.perf_counter() - began

    yield round_


async def measure(name: str, client: Callable[[S3Engine], AbstractAsyncContextManager[Round]], engine: S3Engine,
                  size: int, rounds: int) -> dict[str, Any]:
    blobs = []
    for i in range(rounds):  # made and hashed before the clock and the ticker start
        data = hashlib.sha256(f"{name}{i}".encode()).digest() * (size // 32)
        blobs.append((data, Digest.of(data)))
    # Opening a botocore client loads its service model (~0.3 s on the loop): once, at startup.
    async with client(engine) as round_:
        stall = LoopStall()
        ticker = asyncio.create_task(stall.run())
        cpu = time.process_time()
        puts, gets = [], []
        for i, (data, digest) in enumerate(blobs):
            put, get = await round_(data, digest, f"{name}-{i}")
            puts.append(size / MIB / put)
            gets.append(size / MIB / get)
        ticker.cancel()
    return {"client": name, "engine": engine.name, "put": puts, "get": gets,
            "cpu": time.process_time() - cpu, "stall_ms": stall.worst * 1000}


def clients() -> dict[str, Callable[[S3Engine], AbstractAsyncContextManager[Round]]]:
    chosen: dict[str, Callable[[S3Engine], AbstractAsyncContextManager[Round]]] = {
        "aiobotocore": aiobotocore_client,
        "ObjectStore (aiobotocore + digest + MD5)": pullgate_client,
    }
    try:
        import obstore  # noqa: F401
    except ImportError:
        print("obstore is not installed (pip install obstore): measuring pullgate's client only")
    else:
        chosen["obstore"] = obstore_client
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="MiB per object (default 64)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        for engine_class in (SeaweedFS, RadosGateway):
            with engine_class(Path(tmp) / engine_class.name) as engine:
                engine.create_bucket(BUCKET)
                print(f"{engine.name}: started in {engine.startup_seconds:.1f} s")
                for name, client in clients().items():
                    rows.append(asyncio.run(measure(name, client, engine, args.size * MIB, args.rounds)))
    print(f"\n| engine | client | put MiB/s | get MiB/s | CPU s ({args.rounds} x put+get) | worst loop stall |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        put = ", ".join(f"{v:.0f}" for v in row["put"])
        get = ", ".join(f"{v:.0f}" for v in row["get"])
        print(f"| {row['engine']} | {row['client']} | {put} | {get} | {row['cpu']:.2f} | {row['stall_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
