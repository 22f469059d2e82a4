"""Redirect mode (``storage.redirect: true``): a blob GET answers ``307`` to a presigned URL
of the object in a real SeaweedFS once the object is there — after the access check and the
repository's proof, never before — and pullgate serves the blob itself otherwise (not
stored yet, object store down, HEAD). The S3 endpoint is a TCP relay in front of SeaweedFS
(``tests/support/tcprelay.py``) so a test can cut the store off like a dead one."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

from proxy.config.settings import AccessConfig, AccessRule, Config
from proxy.ops.metrics import Metrics
from tests.support.accesssetup import ALICE, ALICE_HASH
from tests.support.origin import Origin
from tests.support.polling import eventually
from tests.support.replicas import BUCKET, Replica, cluster_config, start_replicas
from tests.support.s3engine import S3Engine
from tests.support.tcprelay import TcpRelay

REPO = "library/shared"
LAYER = 3 << 20


@dataclass(frozen=True)
class Case:
    stored: bool = True  # pulled once first, so the object is in the bucket
    users: tuple[str, ...] | None = None  # access on: who may pull REPO
    user: bool = False  # send alice's credentials
    repository: str = REPO  # the name the GET goes to
    store_down: bool = False  # the relay to the object store is cut before the GET
    method: str = "GET"
    range_start: int | None = None
    status: int = 307


CASES = {
    "in_store": Case(),
    "in_store_range": Case(range_start=1000),
    "in_store_access_allowed": Case(users=("alice",), user=True),
    "not_in_store": Case(stored=False, status=200),
    "head_is_answered_here": Case(method="HEAD", status=200),
    "anonymous_denied": Case(users=("alice",), status=401),
    "user_denied": Case(users=("carol",), user=True, status=403),
    "repository_without_proof": Case(repository="library/other", status=404),
    "store_down": Case(store_down=True, status=200),
    "store_down_range": Case(store_down=True, range_start=1000, status=206),
}


def stored(engine: S3Engine, prefix: str, digest: str) -> bool:
    listing = engine.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return any(item["Key"].endswith(digest.partition(":")[2]) for item in listing.get("Contents", []))


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def alice() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(":".join(ALICE).encode()).decode()}


@pytest.fixture
async def relay(seaweedfs_engine: S3Engine) -> AsyncIterator[TcpRelay]:
    relay = await TcpRelay(seaweedfs_engine.port).start()
    yield relay
    await relay.close()


def redirect_config(tmp_path: Path, origin: tuple[Origin, TestServer], engine: S3Engine, relay: TcpRelay,
                    prefix: str) -> Config:  # fmt: skip
    base = cluster_config(tmp_path, str(origin[1].make_url("")).rstrip("/"), engine=engine, redis_url=None,
                          prefix=prefix, s3_endpoint=relay.endpoint)  # fmt: skip
    # A generous S3 timeout: an upload that times out on a busy machine marks the store down
    # (served here, not redirected) until the next health check.
    return replace(base, storage=replace(base.storage, redirect=True, timeout=30.0))


def with_access(config: Config, tmp_path: Path, users: tuple[str, ...]) -> Config:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{ALICE[0]}:{ALICE_HASH}\n")
    rules = (AccessRule(repositories=(f"docker.io/{REPO}",), users=users),)
    return replace(config, access=AccessConfig(enabled=True, htpasswd=htpasswd, rules=rules))


async def warm(session: aiohttp.ClientSession, replica: Replica, digest: str, data: bytes) -> None:
    """A GET before the object is in the store: served here, uploaded behind it."""
    async with session.get(f"{replica.url}/v2/{REPO}/blobs/{digest}", allow_redirects=False) as response:
        assert response.status == 200 and await response.read() == data


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_redirect(
    origin: tuple[Origin, TestServer], seaweedfs_engine: S3Engine, relay: TcpRelay, key_prefix: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case,
) -> None:  # fmt: skip
    upstream, _ = origin
    image = upstream.add_image(REPO, "1", layers=[LAYER])
    upstream.add_image("library/other", "1")  # another repository, without the layer
    digest, data = next((d, b) for d, b in image.blobs.items() if len(b) == LAYER)
    config = redirect_config(tmp_path, origin, seaweedfs_engine, relay, key_prefix)
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        (replica,) = await stack.enter_async_context(
            start_replicas(tmp_path, config, 1, monkeypatch, seaweedfs_engine)
        )
        if case.stored:
            await warm(session, replica, digest, data)
            await eventually(lambda: stored(seaweedfs_engine, key_prefix, digest), timeout=30, step=0.1)
        subject = replica
        if case.users is not None:  # a replica with access on, sharing the bucket (no local copy, no proof)
            access = with_access(config, tmp_path, case.users)
            (subject,) = await stack.enter_async_context(
                start_replicas(tmp_path / "access", access, 1, monkeypatch, seaweedfs_engine)
            )
        if case.store_down:
            await relay.close()
        headers = alice() if case.user else {}
        if case.range_start is not None:
            headers["Range"] = f"bytes={case.range_start}-"
        url = f"{subject.url}/v2/{case.repository}/blobs/{digest}"
        with structlog.testing.capture_logs() as logs:
            async with session.request(case.method, url, headers=headers, allow_redirects=False) as response:
                body = await response.read()
            # The client can hold every byte (sent by a sender thread) a moment before the
            # handler returns and logs the request.
            await eventually(lambda: any(e["event"] == "http_request" and e["endpoint"] == "blob" for e in logs))
        assert response.status == case.status, body[:300]
        requests = [e for e in logs if e["event"] == "http_request" and e["endpoint"] == "blob"]
        metrics = subject.mirror.metrics
        redirected = counted(metrics, "pullgate_blob_redirects_total", result="redirected")
        if case.status != 307:
            assert "Location" not in response.headers
            assert redirected == 0
        if case.status in (200, 206) and case.method == "GET":
            assert body == data[case.range_start or 0 :]
            assert requests[0]["cache"] in ("hit", "miss")
        if case.method == "HEAD":
            assert response.headers["Content-Length"] == str(LAYER)
        if case.store_down:
            assert counted(metrics, "pullgate_blob_redirects_total", result="unavailable") == 1
            assert metrics.object_store_up._value.get() == 0
        if not case.stored:
            assert counted(metrics, "pullgate_blob_redirects_total", result="not_stored") == 1
            await eventually(lambda: stored(seaweedfs_engine, key_prefix, digest), timeout=30, step=0.1)
            await check_redirect(session, subject, digest, data, None)  # the next GET is redirected
        if case.status == 307:
            assert requests[0]["cache"] == "redirect" and requests[0]["bytes"] == 0
            assert response.headers["Cache-Control"] == "no-store"
            assert redirected == 1
            assert counted(metrics, "pullgate_cache_requests_total", kind="blob", result="redirect") == 1
            await follow(session, response.headers["Location"], data, case.range_start, relay)


async def follow(
    session: aiohttp.ClientSession, location: str, data: bytes, start: int | None, relay: TcpRelay
) -> None:
    """The presigned URL gives the bytes (a Range too) straight from the object store."""
    assert location.startswith(relay.endpoint + "/") and "Signature=" in location
    before = relay.bytes_down
    headers = {"Range": f"bytes={start}-"} if start is not None else {}
    async with session.get(location, headers=headers) as answer:
        assert answer.status == (206 if start is not None else 200)
        assert await answer.read() == data[start or 0 :]
    assert relay.bytes_down - before >= len(data) - (start or 0)


async def check_redirect(
    session: aiohttp.ClientSession, replica: Replica, digest: str, data: bytes, start: int | None
) -> None:
    """A client that follows redirects itself (aiohttp) gets the blob."""
    headers = {"Range": f"bytes={start}-"} if start is not None else {}
    async with session.get(f"{replica.url}/v2/{REPO}/blobs/{digest}", headers=headers) as answer:
        assert answer.status == (206 if start is not None else 200)
        assert [r.status for r in answer.history] == [307]
        assert await answer.read() == data[start or 0 :]
