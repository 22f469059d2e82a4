"""Registry authentication challenges, where their realms may send our credentials, and
the bearer tokens they lead to.

Token flow: https://distribution.github.io/distribution/spec/auth/token/ — a 401 carries
``WWW-Authenticate: Bearer realm="...",service="...",scope="..."``; we GET the realm with
``service`` and ``scope`` (Basic credentials if configured), and use the returned ``token``
(or ``access_token``) until ``expires_in`` (default 60 s) runs out.

A realm is followed only to an allowed *origin* — scheme, host and port, as browsers judge
"same origin" (RFC 6454) — never to "the same host" on another port: another port of the
upstream's machine is another service, and it must not receive the upstream's password.
A realm whose token endpoint fails is not asked again until a backoff delay has passed
(``RealmBackoff``); the memory is per realm and expires, so neither a transient failure nor
one bad challenge locks an upstream out until restart.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachetools import TLRUCache
from yarl import URL

from proxy.errors import ConfigError, UpstreamError

_PARAM_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
DEFAULT_EXPIRY = 60.0
# Refresh a little early so a token does not expire between our check and the upstream's.
_EXPIRY_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header (RFC 7235 auth-params)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires: float  # monotonic


class TokenCache:
    """Tokens per (realm, service, scope); never shared across upstreams (each upstream has
    its own cache) because tokens carry that upstream's credentials' rights. Each token
    lives until its own expiry (cachetools' time-aware LRU drops expired ones), and at most
    ``max_tokens`` are kept (one per repository scope pulled recently)."""

    def __init__(self, max_tokens: int = 4096, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._tokens: TLRUCache[tuple[str, str, str], Token] = TLRUCache(
            maxsize=max_tokens, ttu=lambda _key, token, _now: token.expires, timer=clock
        )
        self._clock = clock

    def get(self, realm: str, service: str, scope: str) -> str | None:
        token = self._tokens.get((realm, service, scope))
        return None if token is None else token.value

    def put(self, realm: str, service: str, scope: str, value: str, expires_in: float | None) -> None:
        lifetime = max((expires_in or DEFAULT_EXPIRY) - _EXPIRY_MARGIN, 1.0)
        self._tokens[(realm, service, scope)] = Token(value, self._clock() + lifetime)

    def drop(self, realm: str, service: str, scope: str) -> None:
        self._tokens.pop((realm, service, scope), None)

    def __len__(self) -> int:
        self._tokens.expire()
        return len(self._tokens)


# --- where credentials may go -------------------------------------------------------------
Origin = tuple[str, str, int]  # (scheme, host as connected to, port)
_DEFAULT_PORTS = {"http": 80, "https": 443}


# What yarl raises for a URL it cannot parse. IndexError: yarl 1.25 on an empty host after
# user info ("//][@", found by fuzz_origin) — a hostile upstream's realm or Location.
URL_ERRORS = (ValueError, TypeError, UnicodeError, IndexError)


def origin_of(url: str | URL) -> Origin | None:
    """The origin of an http(s) URL — scheme and host lower-cased (IDNA-encoded), the
    default port filled in — or ``None`` when it is not one: unparsable, another scheme, no
    host, or credentials in it. Parsed by yarl, the parser aiohttp connects with, so the
    origin checked is the origin contacted."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        host, port, scheme = parsed.raw_host, parsed.port, (parsed.scheme or "").lower()
    except URL_ERRORS:
        return None
    if scheme not in _DEFAULT_PORTS or not host or parsed.raw_user is not None or parsed.raw_password is not None:
        return None
    return scheme, host.lower(), port or _DEFAULT_PORTS[scheme]


class AuthOrigins:
    """The origins an upstream's token realms may name: its own origin, the well-known
    token hosts of its registry (``auth.docker.io`` for Docker Hub), or ``auth_hosts``.

    An ``auth_hosts`` entry is an origin (``https://auth.example:8443``) or a host with an
    optional port (``auth.example``: https on 443). Plain http is allowed only when the
    upstream itself is plain http: Basic credentials must not cross in clear text to a
    realm of an upstream reached over TLS."""

    def __init__(self, upstream_url: str, auth_hosts: Iterable[str], well_known: Iterable[str], key: str) -> None:
        own = origin_of(upstream_url)
        if own is None:
            raise ConfigError(f"{key}: the upstream URL has no http(s) origin")
        self.plain = own[0] == "http"
        entries = tuple(auth_hosts)
        listed = {origin for entry in (entries or well_known) for origin in self._parse(entry, key)}
        self.origins = frozenset(listed if entries else {own, *listed})

    def _parse(self, entry: str, key: str) -> tuple[Origin, ...]:
        if "://" in entry:
            origin = origin_of(entry)
            if origin is None:
                raise ConfigError(f"{key}: {entry!r} is not an http(s) origin")
            if origin[0] == "http" and not self.plain:
                raise ConfigError(f"{key}: {entry!r} is plain http but the upstream uses https")
            return (origin,)
        origin = origin_of(f"https://{entry}")
        if origin is None:
            raise ConfigError(f"{key}: {entry!r} is not a host or host:port")
        explicit = URL(f"https://{entry}").explicit_port
        if not self.plain:
            return (origin,)
        return origin, ("http", origin[1], explicit or 80)

    def allows(self, realm: str) -> bool:
        origin = origin_of(realm)
        return origin is not None and origin in self.origins


# --- failure memory -----------------------------------------------------------------------
_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 60.0
_BACKOFF_REALMS = 256  # realms remembered per upstream: a hostile one may vary its realm per request


@dataclass(frozen=True, slots=True)
class _Failure:
    until: float  # monotonic
    delay: float
    kind: type[UpstreamError]
    message: str


class RealmBackoff:
    """Token endpoints that failed, per realm: asked again only after a delay that doubles
    with each failure (1 s up to 60 s) and is forgotten on the first success."""

    def __init__(self, first: float = _BACKOFF_FIRST, most: float = _BACKOFF_MAX) -> None:
        self._first, self._most = first, most
        self._failures: dict[str, _Failure] = {}

    def check(self, realm: str) -> None:
        """Raise the realm's last error (saying when it is tried again) while it backs off."""
        failure = self._failures.get(realm)
        if failure is None:
            return
        left = failure.until - time.monotonic()
        if left > 0:
            wait = str(math.ceil(left))
            message = f"{failure.message} (not asked again for {wait}s)"
            raise failure.kind(message, headers={"Retry-After": wait})

    def failed(self, realm: str, error: UpstreamError) -> None:
        now = time.monotonic()
        previous = self._failures.get(realm)
        if previous is not None and previous.until > now:
            return  # a concurrent request's failure: one outage, one step of backoff
        delay = self._first if previous is None else min(previous.delay * 2, self._most)
        self._failures.pop(realm, None)
        self._failures[realm] = _Failure(now + delay, delay, type(error), error.message)
        while len(self._failures) > _BACKOFF_REALMS:  # oldest failure first
            del self._failures[next(iter(self._failures))]

    def succeeded(self, realm: str) -> None:
        self._failures.pop(realm, None)
