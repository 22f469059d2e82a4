"""What replicas agree on through Redis: a lease per name (one downloader per digest in the
cluster) with fencing tokens, tag -> digest records with a TTL, provenance proofs (which
repository an upstream showed holds a digest, ``proxy.registry.provenance``), and whether
Redis answers (``up``, exported as ``pullgate_coordination_up``).

Leases follow the single-instance pattern of https://redis.io/docs/latest/develop/use/patterns/distributed-locks/:
the key is created only if absent (``SET NX PX`` semantics) with a value unique to the holder;
renewal and release are Lua compare-and-set scripts, so a holder whose lease expired and was
taken over can neither extend nor delete the new holder's lease. Each acquisition also takes
a *fencing token* from one counter in the same script, so tokens grow strictly in the order
leases were granted; ``fenced_set`` refuses writes carrying a token older than the last one
that wrote (https://martin.kleppmann.com/2016/02/08/how-to-do-distributed-locking.html):
a holder that stalled past its TTL cannot overwrite what its successor wrote.

Every command has a deadline (``coordination.timeout``); failures raise
``CoordinationUnavailable`` and flip ``up``, which callers treat as "work alone": serve
from local tiers and the object store, without cluster-wide single flight.
Scripts touch keys in different hash slots (lease and counter), so this targets one
Redis (or Valkey) primary, not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from proxy.config.storage import CoordinationConfig
from proxy.errors import DigestInvalid, PullgateError
from proxy.oci.digest import Digest

T = TypeVar("T")
_WAIT_STEP = 0.05

# KEYS: lease, fence counter. ARGV: owner, note, ttl ms. Returns the token, or nil when held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. '|' .. ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return token
"""
# KEYS: lease. ARGV: the holder's value, ttl ms. 1 when still ours and extended.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lease. ARGV: the holder's value. 1 when it was ours and is now gone.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: record. ARGV: token, value, ttl ms. 1 when written (token not older than the last writer's).
_FENCED_SET = """
local last = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if tonumber(ARGV[1]) < last then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class CoordinationUnavailable(PullgateError):
    """Redis did not answer in time; callers degrade to what one replica can do alone."""

    code, status = "UNAVAILABLE", 503


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    token: int  # fencing token: grows with every lease granted in the cluster
    owner: str  # the replica (Coordinator.owner) holding it
    note: str  # what the holder published, e.g. its peer URL for streaming

    @classmethod
    def parse(cls, value: str) -> LeaseHolder | None:
        token, sep, rest = value.partition("|")
        owner, sep2, note = rest.partition("|")
        if not (sep and sep2 and token.isdigit()):
            return None
        return cls(int(token), owner, note)

    @property
    def value(self) -> str:
        return f"{self.token}|{self.owner}|{self.note}"


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    checked: float  # epoch seconds when the upstream last confirmed it


class Lease:
    """A held lease. ``lost`` is set when renewal finds it gone (expired and maybe taken
    over) or cannot reach Redis before it would expire: stop acting on it then."""

    def __init__(self, coordinator: Coordinator, name: str, holder: LeaseHolder, ttl: float) -> None:
        self._coordinator = coordinator
        self.name = name
        self.holder = holder
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.renewed = time.monotonic()
        self._renewer: asyncio.Task[None] | None = None

    @property
    def token(self) -> int:
        return self.holder.token

    async def renew(self) -> bool:
        ok = await self._coordinator.script(_RENEW, [self.name], [self.holder.value, _ms(self.ttl)])
        if ok:
            self.renewed = time.monotonic()
        else:
            self.lost.set()
        return bool(ok)

    async def release(self) -> bool:
        """Give the lease up; False when it was no longer ours."""
        self.lost.set()
        return bool(await self._coordinator.script(_RELEASE, [self.name], [self.holder.value]))

    async def keep_alive(self) -> None:
        """Renew every third of the TTL until cancelled or lost."""
        while not self.lost.is_set():
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except CoordinationUnavailable:
                if time.monotonic() - self.renewed >= self.ttl:
                    self.lost.set()

    def start_renewing(self) -> None:
        """Run ``keep_alive`` in the background until ``finish``."""
        if self._renewer is None:
            self._renewer = asyncio.create_task(self.keep_alive())

    async def finish(self) -> None:
        """Stop renewing, then release (when Redis is away it expires on its own).

        ``lost`` is set first, so a renewer whose cancellation a library swallowed (as
        redis-py's ``wait_for`` did, see ``Coordinator.open``) still ends after the renewal
        in flight instead of renewing forever; ``asyncio.wait`` waits for it without the
        ``suppress(CancelledError)`` that would also swallow a cancel of our caller."""
        self.lost.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            await asyncio.wait([renewer])
        with suppress(CoordinationUnavailable):
            await self.release()


class Coordinator:
    def __init__(
        self,
        client: aioredis.Redis,
        config: CoordinationConfig,
        *,
        owner: str | None = None,
        on_health: Callable[[bool], None] = lambda up: None,
    ) -> None:
        self.client = client  # for callers' own commands, each sent through ``call``
        self.prefix = config.key_prefix
        self.timeout = config.timeout
        self.lease_ttl = config.lease_ttl
        self.owner = owner or secrets.token_hex(8)
        self._on_health = on_health
        self.up: bool | None = None  # unknown until the first command
        self._scripts: dict[str, Any] = {}
        self._log = structlog.get_logger("pullgate.coordination")

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: CoordinationConfig,
        environ: Mapping[str, str] | None = None,
        *,
        owner: str | None = None,
        on_health: Callable[[bool], None] = lambda up: None,
    ) -> AsyncIterator[Coordinator]:
        if config.url is None:
            raise ValueError("coordination.url is required")
        # ``socket_timeout=None`` (redis-py 8 defaults to 5 s): ``call`` bounds every command.
        # With a socket timeout redis-py sends each command under ``asyncio.wait_for``, which
        # on Python 3.11 (our image) returns instead of raising when the cancel lands as the
        # send completes (https://github.com/python/cpython/issues/86296, fixed in 3.12): a
        # cancelled lease renewer then renewed forever, and the download holding it never
        # finished. ``socket_connect_timeout`` runs under ``asyncio.timeout``, which is safe.
        client = aioredis.Redis.from_url(
            config.url, username=config.username, password=config.password(environ), decode_responses=True,
            socket_timeout=None, socket_connect_timeout=config.timeout, health_check_interval=30,
        )  # fmt: skip
        try:
            yield cls(client, config, owner=owner, on_health=on_health)
        finally:
            await _close(client, config.timeout)

    # --- every command goes through here ----------------------------------------------------
    async def call(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        """Send one command within the timeout; ``CoordinationUnavailable`` (and ``up``
        flipped) when Redis does not answer."""
        try:
            async with asyncio.timeout(self.timeout):
                result = await request()
        except (RedisError, OSError, TimeoutError) as exc:
            self._health(False, operation, exc)
            raise CoordinationUnavailable(f"redis {operation} failed: {exc.__class__.__name__}") from exc
        self._health(True, operation, None)
        return result

    def _health(self, up: bool, operation: str, error: BaseException | None) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            self._log.info("coordination_up")
        else:
            self._log.warning("coordination_down", operation=operation, error=error.__class__.__name__)
        self._on_health(up)

    async def script(self, source: str, names: list[str], args: list[str | int]) -> Any:
        """Run a Lua script (registered once) on ``names`` under the key prefix."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        keys = [self.prefix + name for name in names]
        return await self.call("script", lambda: script(keys=keys, args=args))

    async def ping(self) -> bool:
        """Whether Redis answers now (updates ``up``); never raises."""
        with suppress(CoordinationUnavailable):
            await self.call("ping", self.client.ping)
        return bool(self.up)

    # --- leases -----------------------------------------------------------------------------
    async def acquire(self, name: str, *, ttl: float | None = None, note: str = "") -> Lease | None:
        """The lease ``name`` if nobody holds it, else None."""
        seconds = self.lease_ttl if ttl is None else ttl
        lease_key = f"lease:{name}"
        token = await self.script(_ACQUIRE, [lease_key, "fence"], [self.owner, note, _ms(seconds)])
        if token is None:
            return None
        return Lease(self, lease_key, LeaseHolder(int(token), self.owner, note), seconds)

    async def holder(self, name: str) -> LeaseHolder | None:
        value = await self.call("get", lambda: self.client.get(f"{self.prefix}lease:{name}"))
        return None if value is None else LeaseHolder.parse(_text(value))

    @asynccontextmanager
    async def hold(self, name: str, *, ttl: float | None = None, note: str = "") -> AsyncIterator[Lease | None]:
        """Acquire, renew in the background while inside, release on the way out.
        Yields None when someone else holds it."""
        lease = await self.acquire(name, ttl=ttl, note=note)
        if lease is None:
            yield None
            return
        lease.start_renewing()
        try:
            yield lease
        finally:
            await lease.finish()

    async def wait_released(self, name: str, timeout: float) -> bool:
        """Wait until nobody holds ``name`` (released or expired); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while await self.holder(name) is not None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_WAIT_STEP)
        return True

    # --- fenced records ---------------------------------------------------------------------
    async def fenced_set(self, lease: Lease, name: str, value: str, *, ttl: float) -> bool:
        """Write ``value`` unless a holder with a newer token already wrote ``name``."""
        return bool(await self.script(_FENCED_SET, [f"record:{name}"], [lease.token, value, _ms(ttl)]))

    async def fenced_get(self, name: str) -> tuple[int, str] | None:
        """(token of the writer, value) of a fenced record."""
        key = f"{self.prefix}record:{name}"
        record: dict[Any, Any] = await self.call("hgetall", lambda: self.client.hgetall(key))
        if not record:
            return None
        return int(record["token"]), _text(record["value"])

    # --- cluster secrets --------------------------------------------------------------------
    async def shared_secret(self, name: str) -> str:
        """One random value per cluster under ``name``: created by the first replica that
        asks (``SET NX``), read by the others."""
        key = f"{self.prefix}secret:{name}"
        candidate = secrets.token_urlsafe(32)
        await self.call("set", lambda: self.client.set(key, candidate, nx=True))
        value = await self.call("get", lambda: self.client.get(key))
        if value is None:  # removed between the two commands: ask again next time
            raise CoordinationUnavailable(f"redis lost {name}")
        return _text(value)

    # --- tags -------------------------------------------------------------------------------
    def _tag_key(self, upstream: str, repository: str, tag: str) -> str:
        # Repositories and tags cannot contain ':' (distribution spec), so the key is
        # unambiguous; refuse rather than let one (upstream, repository, tag) alias another.
        if ":" in repository or ":" in tag:
            raise ValueError(f"repository and tag cannot contain ':': {repository!r} {tag!r}")
        return f"{self.prefix}tag:{upstream}:{repository}:{tag}"

    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: Digest, *, ttl: float, checked: float | None = None
    ) -> None:
        """Remember ``tag`` -> ``digest`` for ``ttl`` seconds (the longest a stale answer may live)."""
        value = f"{digest}|{time.time() if checked is None else checked!r}"
        key = self._tag_key(upstream, repository, tag)
        await self.call("set", lambda: self.client.set(key, value, px=_ms(ttl)))

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        key = self._tag_key(upstream, repository, tag)
        value = await self.call("get", lambda: self.client.get(key))
        if value is None:
            return None
        digest, _, checked = _text(value).partition("|")
        try:
            return TagRecord(Digest.parse(digest), float(checked))
        except (DigestInvalid, ValueError):
            self._log.warning("coordination_record_invalid", key=key)
            return None

    async def forget_tag(self, upstream: str, repository: str, tag: str) -> None:
        key = self._tag_key(upstream, repository, tag)
        await self.call("del", lambda: self.client.delete(key))

    # --- proofs (proxy.registry.provenance) --------------------------------------------------
    def _proof_key(self, upstream: str, repository: str, digest: Digest) -> str:
        # A digest is ``algorithm:hex`` with exactly one ':' and a repository has none
        # (distribution spec), so read from the right the key names one (upstream,
        # repository, digest): a proof for one repository can never be read as another's.
        if ":" in repository:
            raise ValueError(f"repository cannot contain ':': {repository!r}")
        return f"{self.prefix}proof:{upstream}:{repository}:{digest}"

    async def set_proof(self, upstream: str, repository: str, digest: Digest, *, checked: float, ttl: float) -> None:
        """``upstream`` showed at ``checked`` that ``repository`` holds ``digest``; kept ``ttl`` seconds."""
        key = self._proof_key(upstream, repository, digest)
        await self.call("set", lambda: self.client.set(key, repr(checked), px=_ms(ttl)))

    async def get_proof(self, upstream: str, repository: str, digest: Digest) -> float | None:
        """When the proof was last shown (epoch seconds), or None."""
        key = self._proof_key(upstream, repository, digest)
        value = await self.call("get", lambda: self.client.get(key))
        if value is None:
            return None
        try:
            return float(_text(value))
        except ValueError:
            self._log.warning("coordination_record_invalid", key=key)
            return None

    async def forget_proof(self, upstream: str, repository: str, digest: Digest) -> None:
        key = self._proof_key(upstream, repository, digest)
        await self.call("del", lambda: self.client.delete(key))


def _text(value: str | bytes) -> str:
    # The client decodes responses (decode_responses=True); its types cannot know that.
    return value if isinstance(value, str) else value.decode()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))



async def _close(client: aioredis.Redis, timeout: float) -> None:
    """Close the client's connections, within ``timeout``: a replica shutting down must not
    wait on Redis forever (redis-py's close awaits each connection's close handshake and
    its own housekeeping tasks; none of it carries a deadline of its own here). What is
    left open then goes with the client object."""
    try:
        async with asyncio.timeout(timeout):
            await client.aclose()
    except TimeoutError:
        structlog.get_logger("pullgate.coordination").warning("coordination_close_timeout", seconds=timeout)
