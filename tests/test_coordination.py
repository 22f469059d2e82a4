"""Coordination through a real Redis (Debian's redis-server): one lease holder among racing
replicas, takeover after expiry with a larger fencing token, a stale holder that can neither
renew, release nor overwrite its successor's record, renewal that outlives the TTL, tags
with a TTL, and Redis going away and coming back (``up`` and the health callback)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio
import structlog

from proxy.config.storage import CoordinationConfig
from proxy.oci.digest import Digest
from proxy.registry.coordination import CoordinationUnavailable, Coordinator, Lease, LeaseHolder, TagRecord
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer

DIGEST = Digest.of(b"layer")


@pytest.fixture
def config(redis_server: RedisServer, key_prefix: str) -> CoordinationConfig:
    """Each test under its own key prefix on the session's Redis. The command timeout is
    generous: a loaded 2-core CI machine has stalled a loopback Redis command past 1 s (40
    racing acquires, 0.06 s when quiet); tests of timeouts set their own."""
    return CoordinationConfig(
        type="redis", url=redis_server.url, key_prefix=f"pg-{key_prefix.strip('/')}:", timeout=5.0, lease_ttl=15.0
    )


@asynccontextmanager
async def replicas(config: CoordinationConfig, count: int) -> AsyncIterator[list[Coordinator]]:
    """``count`` coordinators with their own connections, as separate replicas would have."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Coordinator.open(config, {}, owner=f"replica-{i}")) for i in range(count)
        ]


async def test_one_lease_among_racing_replicas(config: CoordinationConfig) -> None:
    async with replicas(config, 4) as nodes:
        attempts = [node.acquire(str(DIGEST), note=f"http://10.0.0.{i}:5000") for i, node in enumerate(nodes * 10)]
        leases = [lease for lease in await asyncio.gather(*attempts) if lease is not None]
        assert len(leases) == 1
        (lease,) = leases
        holder = await nodes[0].holder(str(DIGEST))
        assert holder == lease.holder
        assert holder is not None and holder.note.startswith("http://10.0.0.")
        # Another digest is independent, and its token is newer.
        other = await nodes[1].acquire("sha256:other")
        assert other is not None and other.token > lease.token


async def test_expired_lease_is_taken_over_and_the_stale_holder_is_fenced(config: CoordinationConfig) -> None:
    async with replicas(config, 2) as (a, b):
        first = await a.acquire("blob", ttl=1.0)
        assert first is not None
        assert await b.acquire("blob") is None
        assert await a.fenced_set(first, "quota", "written by a", ttl=60)
        await asyncio.sleep(1.2)  # a stalls past its TTL (GC pause, lost network...)
        second = await b.acquire("blob", ttl=30)
        assert second is not None and second.token > first.token
        assert await b.fenced_set(second, "quota", "written by b", ttl=60)
        # The stale holder's late actions all fail and change nothing.
        assert await first.renew() is False
        assert first.lost.is_set()
        assert await first.release() is False
        assert await a.fenced_set(first, "quota", "late write by a", ttl=60) is False
        assert await b.holder("blob") == second.holder
        assert await b.fenced_get("quota") == (second.token, "written by b")
        assert await second.release() is True
        assert await a.holder("blob") is None


async def test_held_lease_is_renewed_past_its_ttl_and_released_on_exit(config: CoordinationConfig) -> None:
    async with replicas(config, 2) as (a, b):
        async with a.hold("blob", ttl=1.0) as lease:
            assert lease is not None
            for _ in range(6):  # three TTLs; TTLs under a second flake on a loaded 2-core machine
                await asyncio.sleep(0.5)
                assert await b.acquire("blob") is None
            assert not lease.lost.is_set()
            async with b.hold("blob") as nothing:
                assert nothing is None
        assert await b.wait_released("blob", timeout=0.1)  # released, not expired
        assert await b.acquire("blob") is not None


async def test_a_cancelled_command_ends_cancelled_wherever_the_cancel_lands(config: CoordinationConfig) -> None:
    """A cancel at any point of a command (connect, send, read) ends it with CancelledError.
    With redis-py's ``socket_timeout`` the send ran under ``asyncio.wait_for``, which on
    Python 3.11 returned the result instead (cpython#86296): about a third of these cancels
    were lost, and a cancelled lease renewer renewed forever."""
    async with replicas(config, 1) as (node,):
        lease = await node.acquire("blob", ttl=60)
        assert lease is not None
        lost, landed = [], 0
        for yields in [n for n in range(10) for _ in range(12)]:
            renewal = asyncio.create_task(lease.renew())
            for _ in range(yields):
                await asyncio.sleep(0)
            if renewal.done():
                continue
            renewal.cancel()
            landed += 1
            try:
                await renewal
            except asyncio.CancelledError:
                continue
            lost.append(yields)
        assert landed > 30, "the cancels should land while commands are in flight"
        assert lost == [], f"cancellation swallowed after these many loop turns: {lost}"


async def test_finishing_a_lease_ends_a_renewer_that_swallows_its_cancellation(
    config: CoordinationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: should any library lose the renewer's cancellation again, leaving
    ``hold`` (``Lease.finish``) still ends it after the renewal in flight, instead of waiting
    on it forever."""
    renewing = asyncio.Event()
    renewers: list[asyncio.Task[object] | None] = []

    async def stubborn_renew(self: Lease) -> bool:
        renewers.append(asyncio.current_task())
        renewing.set()
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:  # swallowed, as 3.11's wait_for did; and it takes a while
            await asyncio.sleep(0.3)
        return True

    monkeypatch.setattr(Lease, "renew", stubborn_renew)
    async with replicas(config, 2) as (a, b):
        async with asyncio.timeout(10):
            async with a.hold("blob", ttl=0.3) as lease:
                assert lease is not None
                await renewing.wait()
            assert await b.acquire("blob") is not None  # released on the way out
        # ... and finishing a lease does not swallow a cancel of its caller either.
        lease = await a.acquire("other", ttl=0.3)
        assert lease is not None
        renewing.clear()
        lease.start_renewing()
        await renewing.wait()
        finishing = asyncio.create_task(lease.finish())
        await asyncio.sleep(0.05)  # waiting for the renewal in flight
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finishing
        renewer = renewers[-1]
        assert renewer is not None
        ended, _ = await asyncio.wait({renewer}, timeout=5)
        assert ended == {renewer}, "the renewer must end after its renewal in flight"


async def test_wait_released_follows_release_and_gives_up_after_timeout(config: CoordinationConfig) -> None:
    async with replicas(config, 2) as (a, b):
        lease = await a.acquire("blob")
        assert lease is not None
        began = time.monotonic()
        assert await b.wait_released("blob", timeout=0.2) is False
        assert time.monotonic() - began < 2
        releaser = asyncio.create_task(asyncio.sleep(0.1))
        releaser.add_done_callback(lambda _: asyncio.ensure_future(lease.release()))
        assert await b.wait_released("blob", timeout=5) is True


async def test_tags_expire_and_can_be_forgotten(config: CoordinationConfig) -> None:
    async with replicas(config, 2) as (a, b):
        await a.set_tag("docker.io", "library/alpine", "3", DIGEST, ttl=1.0, checked=1000.5)
        assert await b.get_tag("docker.io", "library/alpine", "3") == TagRecord(DIGEST, 1000.5)
        assert await b.get_tag("docker.io", "library/alpine", "4") is None
        assert await b.get_tag("ghcr.io", "library/alpine", "3") is None
        await asyncio.sleep(1.2)
        assert await b.get_tag("docker.io", "library/alpine", "3") is None
        await a.set_tag("docker.io", "library/alpine", "3", DIGEST, ttl=60)
        record = await b.get_tag("docker.io", "library/alpine", "3")
        assert record is not None and abs(record.checked - time.time()) < 5
        await b.forget_tag("docker.io", "library/alpine", "3")
        assert await a.get_tag("docker.io", "library/alpine", "3") is None


@pytest.mark.parametrize(("repository", "tag"), [("library/alpine:3", "latest"), ("library/alpine", "3:x")])
async def test_tag_keys_cannot_alias(config: CoordinationConfig, repository: str, tag: str) -> None:
    async with replicas(config, 1) as (node,):
        with pytest.raises(ValueError, match="cannot contain ':'"):
            await node.set_tag("docker.io", repository, tag, DIGEST, ttl=60)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7|replica-1|http://10.0.0.1:5000", LeaseHolder(7, "replica-1", "http://10.0.0.1:5000")),
        ("7|replica-1|a|b", LeaseHolder(7, "replica-1", "a|b")),  # the note is free text
        ("7|replica-1|", LeaseHolder(7, "replica-1", "")),
        ("x|replica-1|", None),
        ("7|replica-1", None),
        ("", None),
    ],
)
def test_lease_holder_parse(value: str, expected: LeaseHolder | None) -> None:
    assert LeaseHolder.parse(value) == expected
    if expected is not None and "|" not in expected.note:
        assert expected.value == value


async def test_redis_outage_flips_up_and_fails_fast(tmp_path: Path) -> None:
    health: list[bool] = []
    with RedisServer(tmp_path / "redis") as server:
        config = CoordinationConfig(type="redis", url=server.url, timeout=0.5, lease_ttl=1.5)
        async with Coordinator.open(config, {}, on_health=health.append) as node:
            assert await node.ping() is True
            async with node.hold("blob") as lease:
                assert lease is not None
                server.stop()
                began = time.monotonic()
                assert await node.ping() is False
                with pytest.raises(CoordinationUnavailable):
                    await node.acquire("other")
                with pytest.raises(CoordinationUnavailable):
                    await node.get_tag("docker.io", "library/alpine", "3")
                assert time.monotonic() - began < 3 * config.timeout + 3
                # Renewals cannot reach Redis: the holder learns it lost the lease within a TTL.
                await asyncio.wait_for(lease.lost.wait(), config.lease_ttl + 1.5)
            server.start()  # same port, empty
            assert await node.ping() is True
            assert await node.acquire("blob") is not None
        assert health == [True, False, True]


@pytest.mark.parametrize(
    ("password_env", "environ", "expected"),
    [
        ("REDIS_PASSWORD", {"REDIS_PASSWORD": "correct-horse-battery"}, None),
        ("REDIS_PASSWORD", {"REDIS_PASSWORD": "wrong-horse-battery"}, "CoordinationUnavailable"),
        (None, {}, "CoordinationUnavailable"),
    ],
)
async def test_password_from_environment(
    tmp_path: Path,
    secret: Callable[[str], str],
    password_env: str | None,
    environ: dict[str, str],
    expected: str | None,
) -> None:
    with RedisServer(tmp_path / "redis", password=secret("correct-horse-battery")) as server:
        config = CoordinationConfig(type="redis", url=server.url, password_env=password_env, timeout=1.0)
        async with Coordinator.open(config, environ) as node:
            if expected is None:
                assert await node.acquire("blob") is not None
            else:
                with pytest.raises(CoordinationUnavailable):
                    await node.acquire("blob")
                assert node.up is False


async def test_unreachable_redis_is_unavailable_not_an_exception_storm() -> None:
    config = CoordinationConfig(type="redis", url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    async with Coordinator.open(config, {}) as node:
        assert await node.ping() is False
        with pytest.raises(CoordinationUnavailable):
            await node.holder("blob")


async def test_closing_never_waits_past_the_timeout(
    config: CoordinationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica shutting down is not held by a client close that never returns."""
    import redis.asyncio

    async def never_returns(self: redis.asyncio.Redis, close_connection_pool: bool | None = None) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(redis.asyncio.Redis, "aclose", never_returns)
    config = dataclasses.replace(config, timeout=1.0, lease_ttl=3.0)
    began = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        async with replicas(config, 1) as (node,):
            assert await node.ping() is True
    assert time.monotonic() - began < config.timeout + 2
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["coordination_close_timeout"]
