"""The failed-login limit holds against concurrency (issue 13 finding 2).

The attack: 150 parallel Basic logins from one address against ``failed_login_limit: 10``
got 150 password checks (149 x 401, 1 x 200) because every request passed the limit check
before the first failure was recorded. Mounted here against the real app over real
sockets, with the password check slowed to bcrypt-cost-10 speed so requests overlap, and
every check the mirror makes recorded: an address gets at most ``failed_login_limit``
guesses, and an address or a user name at most two checks at once, however the requests
are spread over time, endpoints, user names and source addresses.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.access.passwords import PasswordHash, hash_scrypt
from proxy.config.settings import AccessConfig, AccessRule, CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS
from proxy.ops.limits import FailureWindow, KeyedSlots, TooManyRequests
from tests.support.aio import ServerFactory
from tests.support.origin import Origin

LIMIT = 10
ALICE_PASSWORD = "login-limit-alice-passphrase"
CHECK_SECONDS = 0.05  # how long one password check takes here (bcrypt cost 10: ~0.1 s)


@pytest.fixture(autouse=True)
def _scan_logs_for_credentials(secret: Callable[[str], str]) -> None:
    secret(ALICE_PASSWORD)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Checks:
    """Every password check the mirror runs: the guess, and how many ran at once."""

    guesses: list[str] = field(default_factory=list)
    running: int = 0
    most: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Checks]:
    record = Checks()
    real = PasswordHash.verify

    def verify(self: PasswordHash, password: str) -> bool:
        with record.lock:
            record.guesses.append(password)
            record.running += 1
            record.most = max(record.most, record.running)
        try:
            time.sleep(CHECK_SECONDS)  # runs in a worker thread, as the real check does
            return real(self, password)
        finally:
            with record.lock:
                record.running -= 1

    monkeypatch.setattr(PasswordHash, "verify", verify)
    yield record


@pytest.fixture
async def mirror(aiohttp_server: ServerFactory, origin: tuple[Origin, TestServer], tmp_path: Path) -> TestServer:
    state, upstream = origin
    state.add_image("acme/private", "1")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{hash_scrypt(ALICE_PASSWORD, ln=4)}\nbob:{hash_scrypt('bob-password', ln=4)}\n")
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", str(upstream.make_url("")).rstrip("/")),),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=2, read=5, manifest=5, retries=0, backoff=0.01),
        access=AccessConfig(
            enabled=True,
            htpasswd=htpasswd,
            failed_login_limit=LIMIT,
            rules=(AccessRule(repositories=("docker.io/acme/**",), users=("alice",)),),
        ),
    )
    return await aiohttp_server(create_app(config))


Sessions = Callable[[str], aiohttp.ClientSession]


@pytest.fixture
async def sessions() -> AsyncIterator[Sessions]:
    """``sessions("127.0.0.N")``: a client whose connections come from that loopback address
    (the mirror counts per source address)."""
    opened: dict[str, aiohttp.ClientSession] = {}

    def session(source: str) -> aiohttp.ClientSession:
        if source not in opened:
            connector = aiohttp.TCPConnector(limit=0, local_addr=(source, 0), force_close=True)
            opened[source] = aiohttp.ClientSession(connector=connector)
        return opened[source]

    yield session
    await asyncio.gather(*(s.close() for s in opened.values()))


async def login(session: aiohttp.ClientSession, url: str, user: str, password: str) -> int:
    async with session.get(url, headers=basic(user, password), timeout=aiohttp.ClientTimeout(total=60)) as response:
        await response.read()
        return response.status


def burst_guesses(count: int, right_at: int) -> list[str]:
    return [ALICE_PASSWORD if i == right_at else f"guess-{i:03d}" for i in range(count)]


@pytest.mark.parametrize("path", ["/v2/", "/auth/token", "/v2/acme/private/manifests/1"])
@pytest.mark.parametrize("right_at", [0, 75, 149])
async def test_150_parallel_logins_get_at_most_the_limit_of_guesses(
    mirror: TestServer, sessions: Sessions, checks: Checks, path: str, right_at: int
) -> None:
    url = str(mirror.make_url(path))
    session = sessions("127.0.0.1")
    started = time.monotonic()
    statuses = await asyncio.gather(*(login(session, url, "alice", p) for p in burst_guesses(150, right_at)))
    elapsed = time.monotonic() - started
    counts = Counter(statuses)
    assert set(counts) <= {200, 401, 429}, counts
    assert len(checks.guesses) <= LIMIT and counts[401] + counts[200] <= LIMIT, (counts, len(checks.guesses))
    assert counts[429] >= 150 - LIMIT
    assert checks.most <= 2, "at most two checks at once for one address"
    assert elapsed < 30
    # Sequential guessing goes on only until the limit is used up.
    for i in range(LIMIT + 2):
        await login(session, url, "alice", f"later-{i}")
    wrong = [g for g in checks.guesses if g != ALICE_PASSWORD]
    assert len(wrong) == LIMIT, checks.guesses
    locked = await login(session, url, "alice", ALICE_PASSWORD)
    assert locked in (200, 429)
    if ALICE_PASSWORD not in checks.guesses:
        assert locked == 429, "the right password, sent after the limit, is not even checked"
    registry = mirror.app[METRICS].registry
    rate_limited = registry.get_sample_value("pullgate_auth_failures_total", {"reason": "rate_limited"})
    assert rate_limited is not None and rate_limited >= 150 - LIMIT


async def test_spraying_user_names_from_one_address_is_limited_too(
    mirror: TestServer, sessions: Sessions, checks: Checks
) -> None:
    url = str(mirror.make_url("/v2/"))
    users = [f"user{i}" for i in range(60)] + ["alice", "bob"]
    statuses = await asyncio.gather(*(login(sessions("127.0.0.1"), url, u, "Winter2024!") for u in users))
    assert len(checks.guesses) <= LIMIT
    assert Counter(statuses)[401] <= LIMIT and Counter(statuses)[429] >= len(users) - LIMIT


async def test_one_user_from_many_addresses_gets_two_checks_at_a_time(
    mirror: TestServer, sessions: Sessions, checks: Checks
) -> None:
    """Spread over 30 source addresses, each under its own limit, the guesses against one
    user still run two at a time: the rest are refused at once, not queued."""
    url = str(mirror.make_url("/v2/"))
    sources = [f"127.0.0.{n}" for n in range(10, 40)]
    jobs = [login(sessions(s), url, "alice", f"{s}-guess-{i}") for s in sources for i in range(3)]
    statuses = Counter(await asyncio.gather(*jobs))
    assert checks.most <= 2, checks.most
    assert statuses[429] > 0 and statuses[401] == len(checks.guesses)
    # Other users are not locked out by the attack on alice (their own per-user slots).
    assert await login(sessions("127.0.0.50"), url, "bob", "bob-password") == 200


async def test_one_locked_address_does_not_lock_out_another(
    mirror: TestServer, sessions: Sessions, checks: Checks
) -> None:
    url = str(mirror.make_url("/v2/acme/private/manifests/1"))
    await asyncio.gather(*(login(sessions("127.0.0.2"), url, "alice", f"guess-{i}") for i in range(40)))
    for i in range(LIMIT):
        await login(sessions("127.0.0.2"), url, "alice", f"more-{i}")
    assert await login(sessions("127.0.0.2"), url, "alice", ALICE_PASSWORD) == 429
    assert await login(sessions("127.0.0.3"), url, "alice", ALICE_PASSWORD) == 200


async def test_the_same_credentials_in_parallel_are_one_guess(
    mirror: TestServer, sessions: Sessions, checks: Checks
) -> None:
    """containerd fetches layers in parallel with the same (here: wrong) credentials: one
    check, one failure — not a lockout from one misconfigured node."""
    url = str(mirror.make_url("/v2/"))
    statuses = await asyncio.gather(*(login(sessions("127.0.0.1"), url, "alice", "stale") for _ in range(20)))
    assert statuses == [401] * 20
    assert checks.guesses == ["stale"]
    assert await login(sessions("127.0.0.1"), url, "alice", ALICE_PASSWORD) == 200


# --- the counting itself ----------------------------------------------------------------------
def test_attempts_count_from_their_start() -> None:
    window = FailureWindow(limit=3, window=60)
    with window.begin("a"), window.begin("a"), window.begin("a") as third:
        with pytest.raises(TooManyRequests) as info, window.begin("a"):
            pass
        assert info.value.headers == {"Retry-After": "1"}
        third.failed()
    assert window.retry_after("a") == 0, "two succeeded, one failed"
    for _ in range(2):
        with window.begin("a") as attempt:
            attempt.failed()
    assert window.retry_after("a") > 59
    with pytest.raises(TooManyRequests), window.begin("a"):
        pass
    with window.begin("b"):
        pass


@pytest.mark.parametrize(("holders", "refused"), [(1, False), (2, True)])
def test_keyed_slots(holders: int, refused: bool) -> None:
    slots = KeyedSlots(2)
    with slots.hold("x"):
        if holders == 2:
            with slots.hold("x"), pytest.raises(TooManyRequests), slots.hold("x"):
                pass
        else:
            with slots.hold("x"):
                assert slots.held("x") == 2
        with slots.hold("y"):
            assert slots.held("y") == 1
    assert slots.held("x") == 0 and refused is (holders == 2)
