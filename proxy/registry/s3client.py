"""The S3 client: an aiobotocore client opened from ``StorageConfig``, and ``call``, which
gives every request a deadline and turns failures into ``StorageUnavailable``.

Why aiobotocore (and not obstore): ``bench/bench_s3_clients.py`` on SeaweedFS 4.48 and Ceph
RGW 16.2, loopback, 2 shared cores (load 3-4), one 64 MiB object written in 8 MiB parts and
read back, three rounds, MiB/s; CPU for the three rounds; worst event-loop stall seen:

===========================  ================  ================  ======  ========
client                       SeaweedFS put/get RGW put/get       CPU     stall
===========================  ================  ================  ======  ========
aiobotocore 3.10             54-105 / 578-910  91-152 / 516-657  0.26 s  <= 45 ms
obstore 0.12                 115-123 / 747-903 114-132 / 507-685 0.35 s  <= 43 ms
ObjectStore on aiobotocore   83-96 / 797-961   77-112 / 501-618  0.85 s  <= 59 ms
===========================  ================  ================  ======  ========

(ObjectStore adds what the mirror needs whatever the client: SHA-256 of every byte for the
digest check, MD5 of every part, two parts in flight.) Reads are equal; obstore writes
faster on SeaweedFS; CPU is equal. The choice is aiobotocore because the upload protocol
needs the whole multipart API, which obstore does not expose: complete *after* our digest
check with ``If-None-Match``, abort on failure, and list/abort the incomplete uploads a
killed replica left (obstore's ``put`` is create-only for single-part bodies, completes
multipart uploads itself, and cannot list them). aiobotocore also runs on aiohttp, the
stack pullgate already uses. Making a client reads botocore's JSON models (~0.3 s): open
the store once, before serving (``warm_up_loader_caches`` moves most of it to a thread).

Settings that matter: path-style addressing when an endpoint is given (RGW, SeaweedFS,
MinIO default to it); checksums only where required (botocore >= 1.36 otherwise sends
aws-chunked CRC trailers, which Ceph RGW 16 needs turned off over HTTPS, as the team's field
notes record); payload signing off, because botocore
would SHA-256 each part on the event loop over plain HTTP: callers send ``Content-MD5``
computed in a thread instead, which every engine checks (``BadDigest``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from proxy.config.storage import StorageConfig
from proxy.errors import PullgateError

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

T = TypeVar("T")
_MAX_CONNECTIONS = 64


class StorageUnavailable(PullgateError):
    """The object store did not answer usefully (connect error, timeout, 5xx, refused keys)."""

    code, status = "UNAVAILABLE", 503


class StorageRefused(StorageUnavailable):
    """The object store answered with an S3 error (``code``: ``NoSuchKey``, ``PreconditionFailed``...)."""

    def __init__(self, message: str, *, s3_code: str, http_status: int) -> None:
        super().__init__(message)
        self.s3_code = s3_code
        self.http_status = http_status


def client_config(config: StorageConfig) -> AioConfig:
    return AioConfig(
        connect_timeout=min(config.timeout, 10.0),
        read_timeout=config.timeout,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=_MAX_CONNECTIONS,
        s3={"addressing_style": "path" if config.endpoint else "auto", "payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # botocore reads its JSON service models when a client is made (~0.2 s): in a thread.
        warm_up_loader_caches=True,
    )


@asynccontextmanager
async def open_client(config: StorageConfig, environ: Mapping[str, str] | None = None) -> AsyncIterator[S3Client]:
    """An S3 client for ``config``; keys from the environment variables it names, or the
    AWS default chain (web identity, instance role) when it names none."""
    access, secret = config.credentials(environ) or (None, None)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=config.endpoint,
                region_name=config.region,
                config=client_config(config),
                aws_access_key_id=access,
                aws_secret_access_key=secret,
            )
        )
        yield client


async def call(operation: str, request: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run one S3 request within ``timeout`` seconds (botocore's retries included).

    S3 error answers become ``StorageRefused`` (callers look at ``s3_code`` for the ones they
    expect: 404, 412); transport failures and timeouts become ``StorageUnavailable``.
    """
    try:
        async with asyncio.timeout(timeout):
            return await request()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        code = str(error.get("Code") or status)
        raise StorageRefused(f"object store refused {operation}: {code}", s3_code=code, http_status=status) from exc
    except TimeoutError as exc:
        raise StorageUnavailable(f"object store {operation} timed out after {timeout:g}s") from exc
    except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
        raise StorageUnavailable(f"object store {operation} failed: {exc.__class__.__name__}") from exc


def is_missing(exc: StorageRefused) -> bool:
    return exc.http_status == 404 or exc.s3_code in ("NoSuchKey", "NotFound", "NoSuchUpload")


def is_precondition_failed(exc: StorageRefused) -> bool:
    return exc.http_status == 412 or exc.s3_code == "PreconditionFailed"


async def content_md5(data: bytes) -> str:
    """Base64 MD5 for ``Content-MD5`` (RFC 1864), hashed in a thread: hashlib releases the GIL
    on large buffers, and a 16 MiB part would otherwise stall the loop for ~30 ms."""
    digest = await asyncio.to_thread(lambda: hashlib.md5(data, usedforsecurity=False).digest())
    return base64.b64encode(digest).decode()
