"""Who may pull what (config ``access``): client authentication and pull rules for the
mirror listener. Off by default, for a purely public mirror.

Clients authenticate the way registries ask them to (Distribution spec and Docker's token
flow): ``GET /v2/`` without credentials gets a ``401`` with a Bearer challenge naming our
``/auth/token``, where clients trade Basic credentials (or nothing) for a short-lived token
(``proxy.access.tokens``). Accepted on every request:

- ``Basic user:password`` checked against the htpasswd file (bcrypt/argon2/scrypt hashes)
  — containerd's ``hosts.toml`` can send it as a static header;
- ``Bearer <token>`` issued by ``/auth/token``, or a static token from the tokens file
  (also as ``Basic <token name>:<token>``).

Pull rules map identities and groups to ``UPSTREAM/REPOSITORY`` globs. The check runs after
routing and before any cache lookup, on the route's canonical names, so every spelling of
a repository (``ns`` query, path prefix, upstream host, ``library/`` shorthand) meets the
same rule, and a cached digest is never served through a repository the client may not
pull. Anonymous clients that a rule does not cover get ``401`` (so they retry with
credentials); authenticated ones get ``403``.

Wrong credentials are always ``401``, never a silent fall-back to anonymous. Failed logins
are counted per source address: past ``failed_login_limit`` a minute the address gets
``429`` without its credentials being checked at all, so guessing cannot go on. A password
guess counts from the moment its check starts, and an address or a user name has at most
``_CHECKS_PER_KEY`` checks running at once (more get ``429`` at once): however many requests
arrive together, an address gets at most ``failed_login_limit`` guesses a minute.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog
from cachetools import TTLCache

from proxy.access.passwords import HashFormatError, PasswordHash, parse_htpasswd, parse_tokens, token_digest
from proxy.access.tokens import AccessTokens
from proxy.config.settings import AccessConfig
from proxy.errors import ConfigError, Denied, Unauthorized
from proxy.oci.globs import GlobSet
from proxy.ops.filewatch import Stamp, stamp
from proxy.ops.limits import Attempt, FailureWindow, KeyedSlots, TooManyRequests, client_key
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import supervised
from proxy.registry.routing import Route
from proxy.singleflight import SingleFlight

_REFRESH_INTERVAL = 1.0  # how often the credential files are stat()ed
_CACHE_ENTRIES = 10_000
_VERIFY_SLOTS = 4  # concurrent slow hash verifications (threads); more would starve the pool
_CHECKS_PER_KEY = 2  # password checks running at once per source address, and per user name
_MAX_CREDENTIAL = 1024
# Failures a password check already counted when it started (FailureWindow.begin).
_COUNTED_BY_ATTEMPT = frozenset({"bad_password", "unknown_user"})


@dataclass(frozen=True, slots=True)
class Identity:
    name: str | None  # None: anonymous
    groups: frozenset[str] = frozenset()
    method: str = "anonymous"  # anonymous, password, token

    @property
    def anonymous(self) -> bool:
        return self.name is None


ANONYMOUS = Identity(None)


@dataclass(frozen=True, slots=True)
class _Rule:
    globs: GlobSet
    users: frozenset[str]
    groups: frozenset[str]
    anonymous: bool

    def grants(self, identity: Identity, path: str) -> bool:
        if not self.globs.match(path):
            return False
        if self.anonymous:
            return True
        if identity.name is None:
            return False
        return "*" in self.users or identity.name in self.users or bool(self.groups & identity.groups)


class Rules:
    """The compiled ``access.rules`` and ``access.groups``."""

    def __init__(self, config: AccessConfig) -> None:
        self._rules = tuple(
            _Rule(GlobSet.compile(r.repositories), frozenset(r.users), frozenset(r.groups), r.anonymous)
            for r in config.rules
        )
        self._groups: dict[str, frozenset[str]] = {}
        for group, members in config.groups.items():
            for member in members:
                self._groups[member] = self._groups.get(member, frozenset()) | {group}
        self.anonymous_anywhere = any(r.anonymous for r in self._rules)

    def groups_of(self, name: str) -> frozenset[str]:
        return self._groups.get(name, frozenset())

    def allows(self, identity: Identity, upstream: str, repository: str) -> bool:
        path = f"{upstream}/{repository}"
        return any(rule.grants(identity, path) for rule in self._rules)


def _stamp(path: Path | None) -> Stamp | None:
    return None if path is None else stamp(path)


class CredentialFiles:
    """The htpasswd and tokens files: loaded at start (a bad file is a ``ConfigError``) and,
    while ``watch()`` runs, re-read when they change (a bad edit is logged and the previous
    content kept). Reading and parsing run in a thread: never on the event loop."""

    def __init__(self, htpasswd: Path | None, tokens: Path | None) -> None:
        self._htpasswd, self._tokens_path = htpasswd, tokens
        self._log = structlog.get_logger("pullgate.access")
        self._stamps = self._stat()
        self.users, self.tokens = self._load()
        self.generation = 0

    def _stat(self) -> tuple[Stamp | None, Stamp | None]:
        return _stamp(self._htpasswd), _stamp(self._tokens_path)

    def _load(self) -> tuple[dict[str, PasswordHash], dict[str, str]]:
        users: dict[str, PasswordHash] = {}
        tokens: dict[str, str] = {}
        for key, path in (("access.htpasswd", self._htpasswd), ("access.tokens", self._tokens_path)):
            if path is None:
                continue
            try:
                text = path.read_text()
                if key == "access.htpasswd":
                    users = parse_htpasswd(text, str(path))
                else:
                    tokens = parse_tokens(text, str(path))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{key}: cannot read {path}: {exc.__class__.__name__}") from None
            except HashFormatError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        return users, tokens

    async def refresh(self) -> bool:
        """Re-read the files if they changed since the last look; True when they loaded."""
        stamps = await asyncio.to_thread(self._stat)
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        try:
            self.users, self.tokens = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            self._log.error("access_credentials_reload_failed", error=exc.message)
            return False
        self.generation += 1
        self._log.info("access_credentials_reloaded", users=len(self.users), tokens=len(self.tokens))
        return True

    async def watch(self, interval: float = _REFRESH_INTERVAL) -> None:
        """Look for changes every ``interval`` seconds, forever (a supervised task)."""
        while True:
            await asyncio.sleep(interval)
            await self.refresh()

    def decoy(self) -> PasswordHash | None:
        """Some stored hash, verified against for unknown users so that answering them
        takes as long as a wrong password (the time does not tell which users exist)."""
        return next(iter(self.users.values()), None)


class Access:
    """Authentication (``identify``), authorisation (``authorize``) and the token endpoint
    (``issue``) for mirror requests."""

    def __init__(self, config: AccessConfig, metrics: Metrics) -> None:
        self.config = config
        self.rules = Rules(config)
        self.files = CredentialFiles(config.htpasswd, config.tokens)
        self.tokens = AccessTokens(_token_key(config), config.token_ttl)
        self._metrics = metrics
        self._failures = FailureWindow(config.failed_login_limit)
        self._address_checks = KeyedSlots(_CHECKS_PER_KEY)
        self._user_checks = KeyedSlots(_CHECKS_PER_KEY)
        self._basic_challenge = {"WWW-Authenticate": f'Basic realm="{config.realm}", charset="UTF-8"'}
        # Verified passwords, keyed by an HMAC under a per-process key (not a bare hash of
        # the password), expiring after credential_cache_ttl or when the files change.
        self._cache_key = os.urandom(32)
        self._verified: TTLCache[bytes, int] = TTLCache(_CACHE_ENTRIES, config.credential_cache_ttl)  # -> generation
        self._checks: SingleFlight[bytes, bool] = SingleFlight()
        self._slots = asyncio.Semaphore(_VERIFY_SLOTS)
        self._log = structlog.get_logger("pullgate.access")

    @contextlib.asynccontextmanager
    async def running(self, interval: float = _REFRESH_INTERVAL) -> AsyncIterator[Access]:
        """Watch the credential files (a supervised task) until the context exits."""
        async with supervised(self._metrics, "credentials_watch", lambda: self.files.watch(interval)):
            yield self

    def challenge(self, realm_url: str, scope: str | None = None) -> dict[str, str]:
        """The ``WWW-Authenticate`` header of a 401 from the registry API: a Bearer
        challenge naming our token endpoint (and the scope, as registries do)."""
        value = f'Bearer realm="{self.config.token_realm or realm_url}",service="{self.config.realm}"'
        if scope:
            value += f',scope="{scope}"'
        return {"WWW-Authenticate": value}

    # --- authentication -------------------------------------------------------------------
    async def identify(self, authorization: str | None, remote: str | None, challenge: dict[str, str]) -> Identity:
        """The client's identity (``ANONYMOUS`` without credentials); ``Unauthorized`` with
        ``challenge`` for bad credentials, ``TooManyRequests`` while the address is over the
        failed-login limit."""
        if authorization is None:
            return ANONYMOUS
        address = client_key(remote)
        wait = self._failures.retry_after(address)
        if wait:
            error = TooManyRequests("too many failed logins; retry later", headers={"Retry-After": str(int(wait) + 1)})
            self._rate_limited(remote, error)
            raise error
        scheme, _, value = authorization.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and AccessTokens.looks_like(value):
            identity, reason, user = self._issued(value), "bad_token", None
            if identity == "expired":  # a normal event: the client fetches a new token
                raise Unauthorized("token expired", headers=challenge)
        elif scheme == "bearer":
            identity, reason, user = self._static_token(value), "bad_token", None
        elif scheme == "basic":
            try:
                identity, reason, user = await self._basic(value, address)
            except TooManyRequests as exc:
                self._rate_limited(remote, exc)
                raise
        else:
            identity, reason, user = None, "malformed", None
        if not isinstance(identity, Identity):
            self._failed(address, remote, reason, scheme, user, challenge)
        return identity

    def _rate_limited(self, remote: str | None, error: TooManyRequests) -> None:
        self._metrics.auth_failures.labels("rate_limited").inc()
        retry_after = error.headers.get("Retry-After")
        self._log.warning("auth_rate_limited", remote=remote, retry_after=retry_after, reason=error.message)

    def _failed(
        self, address: str, remote: str | None, reason: str, scheme: str, user: str | None, challenge: dict[str, str]
    ) -> NoReturn:
        if reason not in _COUNTED_BY_ATTEMPT:
            self._failures.record(address)
        self._metrics.auth_failures.labels(reason).inc()
        self._metrics.access_decisions.labels("unauthorized").inc()
        # The user name only when it exists: a typed password in the name field must not
        # end up in the log. Never the password or token.
        scheme = scheme if scheme in ("basic", "bearer") else "other"
        self._log.warning("auth_failed", remote=remote, reason=reason, scheme=scheme, user=user)
        raise Unauthorized("invalid credentials", headers=challenge)

    def _issued(self, token: str) -> Identity | str | None:
        claims = self.tokens.verify(token)
        if claims is None:
            return None
        if claims.expires <= time.time():
            return "expired"
        name = claims.subject
        if name is None:
            return ANONYMOUS
        if name not in self.files.users and name not in self.files.tokens.values():
            return None  # removed since the token was issued
        return Identity(name, self.rules.groups_of(name), "token")

    def _static_token(self, token: str) -> Identity | None:
        if not token or len(token) > _MAX_CREDENTIAL:
            return None
        # A dict lookup by the token's SHA-256: timing can only reveal bits of a hash of a
        # 128+ bit random secret, which leads nowhere.
        name = self.files.tokens.get(token_digest(token))
        return None if name is None else Identity(name, self.rules.groups_of(name), "token")

    async def _basic(self, value: str, address: str) -> tuple[Identity | None, str, str | None]:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, "malformed", None
        user, sep, password = decoded.partition(":")
        if not sep or len(decoded) > _MAX_CREDENTIAL:
            return None, "malformed", None
        if not user and not password:
            # containers/image answers a Basic challenge with empty credentials when it has none.
            return ANONYMOUS, "", None
        token_name = self.files.tokens.get(token_digest(password))
        if token_name is not None and hmac.compare_digest(token_name.encode(), user.encode()):
            return Identity(user, self.rules.groups_of(user), "token"), "", user
        known = user in self.files.users
        if await self._verify(user, password, address):
            return Identity(user, self.rules.groups_of(user), "password"), "", user
        return None, "bad_password" if known else "unknown_user", user if known else None

    async def _verify(self, user: str, password: str, address: str) -> bool:
        key = hmac.new(self._cache_key, f"{user}\0{password}".encode(), "sha256").digest()
        if self._verified.get(key) == self.files.generation:
            return True
        # Concurrent requests with the same credentials (containerd fetches layers in
        # parallel) share one slow verification: one guess, counted once.
        ok = await self._checks.run(key, lambda: self._start_check(user, password, address))
        if ok:
            self._verified[key] = self.files.generation
        return ok

    def _start_check(self, user: str, password: str, address: str) -> asyncio.Future[bool]:
        """A new guess: counted against the address before it runs (``TooManyRequests`` when
        the address has no guess left, or it or the user name has too many checks running)."""
        guard = ExitStack()
        try:
            attempt = guard.enter_context(self._failures.begin(address))
            guard.enter_context(self._address_checks.hold(address))
            guard.enter_context(self._user_checks.hold(user))
        except TooManyRequests:
            guard.close()
            raise
        return asyncio.ensure_future(self._check(user, password, attempt, guard))

    async def _check(self, user: str, password: str, attempt: Attempt, guard: ExitStack) -> bool:
        with guard:  # held until the check ends, whoever stops waiting for it
            ok = await self._slow_verify(user, password)
            if not ok:
                attempt.failed()
            return ok

    async def _slow_verify(self, user: str, password: str) -> bool:
        stored = self.files.users.get(user)
        target = stored or self.files.decoy()
        if target is None:
            return False
        async with self._slots:
            ok = await asyncio.to_thread(target.verify, password)
        return ok and stored is not None

    # --- the token endpoint ---------------------------------------------------------------
    async def issue(self, authorization: str | None, remote: str | None) -> dict[str, object]:
        """``GET /auth/token``: a token for whoever the (optional) credentials name;
        anonymous callers get an anonymous one. Bad credentials: 401 (``docker login``
        reports it), counted like any failed login."""
        if authorization is not None and not authorization.lower().startswith("basic "):
            authorization = None  # a stale Bearer header from an earlier exchange: not credentials
        identity = await self.identify(authorization, remote, self._basic_challenge)
        token = self.tokens.issue(identity.name)
        self._log.debug("access_token_issued", user=identity.name, remote=remote)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {"token": token, "access_token": token, "expires_in": int(self.tokens.ttl), "issued_at": issued}

    # --- authorisation --------------------------------------------------------------------
    def authorize(self, identity: Identity, route: Route, challenge: dict[str, str]) -> None:
        if self.rules.allows(identity, route.upstream, route.repository):
            self._metrics.access_decisions.labels("allowed").inc()
            return
        name = f"{route.upstream}/{route.repository}"
        if identity.anonymous:
            self._metrics.access_decisions.labels("unauthorized").inc()
            raise Unauthorized(f"authentication required to pull {name}", headers=challenge)
        self._metrics.access_decisions.labels("denied").inc()
        self._log.info("access_denied", user=identity.name, upstream=route.upstream, repository=route.repository)
        raise Denied(f"{identity.name} may not pull {name}")


def _token_key(config: AccessConfig) -> bytes:
    secret = config.token_secret()
    if config.token_secret_env and (secret is None or len(secret) < 32):
        raise ConfigError(f"access.token_secret_env: ${config.token_secret_env} must hold at least 32 characters")
    return secret if secret is not None else os.urandom(32)
