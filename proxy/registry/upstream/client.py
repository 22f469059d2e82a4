"""The client for one upstream registry: bearer-token and Basic auth, bounded retries with
backoff, ``429``/``Retry-After``, credential-free redirects, timeouts on every call, and
metrics for all of it.

Only the configured upstream URL is ever contacted, plus token realms on allowed origins
(``auth_hosts``: scheme, host and port) and redirects to https hosts whose addresses pass
``proxy.registry.upstream.netguard`` (no loopback, link-local or private targets unless the
upstream itself is there) — never with our registry credentials attached.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import NoReturn, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config.settings import TimeoutConfig, UpstreamConfig
from proxy.errors import (
    ManifestInvalid,
    NameInvalid,
    UpstreamDenied,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from proxy.oci import jsondoc
from proxy.oci.reference import DOCKER_HUB, normalize_host
from proxy.ops.limits import FetchLimiter
from proxy.ops.metrics import Metrics
from proxy.registry.upstream import netguard
from proxy.registry.upstream.challenge import (
    URL_ERRORS,
    AuthOrigins,
    Challenge,
    RealmBackoff,
    TokenCache,
    parse_challenge,
)

# Token hosts of the big public registries, by API host. Only Docker Hub keeps its realm on
# another host; ghcr.io, quay.io, gcr.io, public.ecr.aws serve tokens from the API host.
# A registry's challenge may send our credentials to these (https, port 443) and its own
# origin, no others. Keyed by the normalized registry name (proxy.oci.reference).
WELL_KNOWN_AUTH_HOSTS: Mapping[str, tuple[str, ...]] = {DOCKER_HUB: ("auth.docker.io",)}
_OWN_ADDRESSES_TTL = 60.0
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
_MAX_RETRY_AFTER = 2.0  # wait inline for short Retry-After; longer ones go back to the client
_MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Upstream(Protocol):
    """What the cache needs from an upstream registry (the seam tests and tools plug into)."""

    name: str

    async def fetch(
        self, method: str, repository: str, path: str, *, headers: Mapping[str, str] | None = None, max_size: int
    ) -> UpstreamResponse: ...

    def open(
        self, method: str, repository: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]: ...


class RegistryClient:
    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        timeouts: TimeoutConfig,
        metrics: Metrics,
        *,
        limiter: FetchLimiter | None = None,
    ) -> None:
        """``limiter``: the server's bound on fetches for mirror clients (None: unlimited,
        for the CLI tools)."""
        self.name = config.name
        self.config = config
        self._session = session
        self._timeouts = timeouts
        self._metrics = metrics
        self._tokens = TokenCache()
        # The last challenge that yielded credentials: sent ahead on later requests. One that
        # did not is never remembered, so it cannot fail requests without asking upstream.
        self._challenge: Challenge | None = None
        self._realm_backoff = RealmBackoff()
        self._host = urlsplit(config.url).hostname or ""
        self._plain = urlsplit(config.url).scheme == "http"
        self._auth_origins = AuthOrigins(
            config.url,
            config.auth_hosts,
            WELL_KNOWN_AUTH_HOSTS.get(_registry_of(self._host), ()),
            f"upstreams.{config.name}.auth_hosts",
        )
        self._own: tuple[float, frozenset[netguard.IPAddress]] | None = None
        self._log = structlog.get_logger("pullgate.upstream").bind(upstream=self.name)
        self._limiter = limiter

    def _permit(self) -> AbstractContextManager[None]:
        return self._limiter.permit() if self._limiter is not None else nullcontext()

    # --- public API ---------------------------------------------------------------------
    async def fetch(
        self, method: str, repository: str, path: str, *, headers: Mapping[str, str] | None = None, max_size: int
    ) -> UpstreamResponse:
        """A whole (small) response: manifests, tag lists, referrers."""
        timeout = aiohttp.ClientTimeout(total=self._timeouts.manifest, connect=self._timeouts.connect)
        with self._permit():
            response = await self._send(method, repository, path, headers, timeout)
            try:
                body = await _read_limited(response, max_size) if method != "HEAD" else b""
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._metrics.upstream_errors.labels(self.name, "read").inc()
                error = describe_error(exc)
                raise UpstreamUnavailable(f"upstream {self.name}: reading response failed: {error}") from exc
            finally:
                response.release()
        return UpstreamResponse(response.status, response.headers, body)

    @asynccontextmanager
    async def open(
        self, method: str, repository: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming response (blobs): no total timeout, but connect and per-read ones."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeouts.connect, sock_read=self._timeouts.read)
        with self._permit():  # held for the whole transfer
            response = await self._send(method, repository, path, headers, timeout)
            try:
                yield response
            finally:
                response.release()

    # --- retries --------------------------------------------------------------------------
    async def _send(
        self, method: str, repository: str, path: str, headers: Mapping[str, str] | None, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        url = f"{self.config.url}/v2/{repository}/{path}" if repository else f"{self.config.url}/v2/"
        attempts = self._timeouts.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = time.monotonic()
            try:
                response = await self._attempt(method, url, repository, headers or {}, timeout)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
                self._metrics.upstream_errors.labels(self.name, kind).inc()
                self._log.warning(
                    "upstream_request_failed", method=method, url=url, error=describe_error(exc), attempt=attempt
                )
                if last:
                    raise UpstreamUnavailable(f"upstream {self.name} unreachable: {kind}") from exc
                await asyncio.sleep(self._timeouts.backoff * 2**attempt)
                continue
            self._metrics.upstream_seconds.labels(self.name, method).observe(time.monotonic() - started)
            self._record_ratelimit(response.headers)
            if response.status == 429:
                response.release()
                self._metrics.upstream_errors.labels(self.name, "rate_limited").inc()
                retry_after = _retry_after(response.headers.get("Retry-After"))
                if last or retry_after > _MAX_RETRY_AFTER:
                    extra = {"Retry-After": str(int(retry_after))} if retry_after else {}
                    raise UpstreamRateLimited(f"upstream {self.name} is rate limiting", headers=extra)
                await asyncio.sleep(retry_after or self._timeouts.backoff * 2**attempt)
                continue
            if response.status >= 500 and response.status != 501:
                response.release()
                self._metrics.upstream_errors.labels(self.name, "status_5xx").inc()
                if last:
                    raise UpstreamUnavailable(f"upstream {self.name} answered {response.status}")
                await asyncio.sleep(self._timeouts.backoff * 2**attempt)
                continue
            return response
        raise AssertionError("unreachable")

    # --- one attempt: auth and redirects --------------------------------------------------
    async def _attempt(
        self, method: str, url: str, repository: str, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        request_headers = CIMultiDict(headers)
        auth = await self._ahead(repository, timeout)
        if auth:
            request_headers["Authorization"] = auth
        response = await self._session.request(
            method, url, headers=request_headers, allow_redirects=False, timeout=timeout
        )
        if response.status == 401:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
            response.release()
            if challenge is None or challenge.scheme not in ("bearer", "basic"):
                self._metrics.upstream_errors.labels(self.name, "auth").inc()
                raise UpstreamDenied(f"upstream {self.name} requires authentication we cannot provide")
            auth = await self._authorization(repository, challenge, timeout, force=True)
            self._challenge = challenge
            if auth:
                request_headers["Authorization"] = auth
            response = await self._session.request(
                method, url, headers=request_headers, allow_redirects=False, timeout=timeout
            )
            if response.status == 401:
                response.release()
                self._metrics.upstream_errors.labels(self.name, "auth").inc()
                raise UpstreamDenied(f"upstream {self.name} refused our credentials")
        if response.status in _REDIRECTS:
            response = await self._follow(method, response, headers, timeout)
        return response

    async def _follow(
        self, method: str, response: aiohttp.ClientResponse, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """Follow redirects (registries send blobs to CDNs) without our Authorization header:
        credentials for the registry must never reach another host."""
        base = str(response.url)
        for _ in range(_MAX_REDIRECTS):
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise UpstreamError(f"upstream {self.name} redirected without a Location")
            try:
                target = URL(urljoin(base, location))
            except URL_ERRORS:
                raise UpstreamError(f"upstream {self.name} redirected to an unparsable Location") from None
            url, server_hostname = await self._check_redirect(target)
            plain = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "host")}
            if url is not target:  # pinned to the checked address: name for Host and TLS
                plain["Host"] = target.raw_authority.rpartition("@")[2]
            response = await self._session.request(
                method, url, headers=plain, allow_redirects=False, timeout=timeout, server_hostname=server_hostname
            )
            base = str(target)
            if response.status not in _REDIRECTS:
                return response
        response.release()
        raise UpstreamError(f"upstream {self.name}: too many redirects")

    async def _check_redirect(self, target: URL) -> tuple[URL, str | None]:
        """The URL to connect to for a redirect target (pinned to a checked address) and the
        TLS server name; ``UpstreamError`` when the target is not allowed."""
        host = target.host or ""
        if target.scheme in ("http", "https") and host == self._host:
            return target, None  # the upstream's own host
        if target.scheme != "https" or not host:
            self._refuse_redirect(host, "scheme")
        try:
            addresses = await netguard.resolve(host, target.port or 443, self._timeouts.connect)
        except (OSError, TimeoutError, UnicodeError):
            self._refuse_redirect(host, "unresolvable")
        own = await self._own_addresses()
        if not all(netguard.allowed(address, own) for address in addresses):
            self._refuse_redirect(host, "address")
        if netguard.literal(host) is not None:
            return target, None
        return netguard.pin(target, addresses[0]), host

    def _refuse_redirect(self, host: str, reason: str) -> NoReturn:
        self._metrics.upstream_errors.labels(self.name, "redirect_refused").inc()
        # The host only: redirect URLs carry presigned credentials in their query.
        self._log.warning("upstream_redirect_refused", host=host[:255], reason=reason)
        raise UpstreamError(f"upstream {self.name} redirected to a disallowed location")

    async def _own_addresses(self) -> frozenset[netguard.IPAddress]:
        now = time.monotonic()
        if self._own is not None and self._own[0] > now:
            return self._own[1]
        port = urlsplit(self.config.url).port or (80 if self._plain else 443)
        try:
            own = frozenset(await netguard.resolve(self._host, port, self._timeouts.connect))
        except (OSError, TimeoutError, UnicodeError):
            own = frozenset()
        self._own = (now + _OWN_ADDRESSES_TTL, own)
        return own

    async def _ahead(self, repository: str, timeout: aiohttp.ClientTimeout) -> str | None:
        """Credentials for the remembered challenge, sent without waiting for a 401. When
        they cannot be had (the realm fails or backs off), the request goes without them:
        the upstream's answer says what it wants now."""
        challenge = self._challenge
        if challenge is None:
            return None
        try:
            return await self._authorization(repository, challenge, timeout)
        except UpstreamError:
            if self._challenge is challenge:
                self._challenge = None
            return None

    async def _authorization(
        self, repository: str, challenge: Challenge, timeout: aiohttp.ClientTimeout, *, force: bool = False
    ) -> str | None:
        if challenge.scheme == "basic":
            return self._basic()
        realm, service = challenge.realm, challenge.params.get("service", "")
        if not realm:
            raise UpstreamDenied(f"upstream {self.name}: bearer challenge without a realm")
        scope = f"repository:{repository}:pull" if repository else challenge.params.get("scope", "")
        token = None if force else self._tokens.get(realm, service, scope)
        if token is None:
            token = await self._fetch_token(realm, service, scope, timeout)
        return f"Bearer {token}"

    def _basic(self) -> str | None:
        """``Authorization: Basic`` for the configured credentials (RFC 7617)."""
        password = self.config.password()
        if self.config.username and password is not None:
            return "Basic " + base64.b64encode(f"{self.config.username}:{password}".encode()).decode()
        return None

    async def _fetch_token(self, realm: str, service: str, scope: str, timeout: aiohttp.ClientTimeout) -> str:
        if not self._auth_origins.allows(realm):
            self._refuse_realm(realm)
        self._realm_backoff.check(realm)
        try:
            token, expires_in = await self._request_token(realm, service, scope, timeout)
        except UpstreamError as exc:
            self._realm_backoff.failed(realm, exc)
            self._log.warning("upstream_token_failed", realm_host=_host_of(realm), error=exc.message)
            raise
        self._realm_backoff.succeeded(realm)
        self._tokens.put(realm, service, scope, token, expires_in)
        return token

    def _refuse_realm(self, realm: str) -> NoReturn:
        self._metrics.upstream_errors.labels(self.name, "realm_refused").inc()
        self._log.warning("upstream_realm_refused", host=_host_of(realm), scheme=realm.partition(":")[0][:10])
        raise UpstreamDenied(f"upstream {self.name}: token realm host is not allowed (auth_hosts: scheme, host, port)")

    async def _request_token(
        self, realm: str, service: str, scope: str, timeout: aiohttp.ClientTimeout
    ) -> tuple[str, float | None]:
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        try:
            async with self._session.get(
                URL(realm),  # the URL whose origin was checked (yarl: aiohttp's own parser)
                params=params,
                headers=_optional("Authorization", self._basic()),
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    self._metrics.upstream_errors.labels(self.name, "auth").inc()
                    raise UpstreamDenied(f"upstream {self.name}: token endpoint answered {response.status}")
                body = await _read_limited(response, _MAX_TOKEN_RESPONSE)
        except ManifestInvalid as exc:  # too large
            self._metrics.upstream_errors.labels(self.name, "auth").inc()
            raise UpstreamDenied(f"upstream {self.name}: token response too large") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.upstream_errors.labels(self.name, "auth").inc()
            raise UpstreamUnavailable(f"upstream {self.name}: token request failed: {exc.__class__.__name__}") from exc
        what = f"upstream {self.name}: token response"
        data = jsondoc.parse_object(body, what, max_depth=8, error=UpstreamUnavailable)
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamDenied(f"upstream {self.name}: token endpoint returned no token")
        expires_in = data.get("expires_in")
        return token, float(expires_in) if isinstance(expires_in, int | float) else None

    def _record_ratelimit(self, headers: Mapping[str, str]) -> None:
        for header, gauge in (
            ("ratelimit-limit", self._metrics.ratelimit_limit),
            ("ratelimit-remaining", self._metrics.ratelimit_remaining),
        ):
            value = headers.get(header)
            if value:
                with suppress(ValueError):
                    gauge.labels(self.name).set(int(value.split(";", 1)[0]))


async def _read_limited(response: aiohttp.ClientResponse, max_size: int) -> bytes:
    if response.content_length is not None and response.content_length > max_size:
        raise ManifestInvalid(f"upstream response of {response.content_length} bytes exceeds {max_size}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > max_size:
            raise ManifestInvalid(f"upstream response exceeds {max_size} bytes")
    return bytes(body)


def _registry_of(host: str) -> str:
    """The host's one spelling (Docker Hub's API host -> ``docker.io``); as is if invalid."""
    try:
        return normalize_host(host)
    except NameInvalid:
        return host


def describe_error(exc: BaseException) -> str:
    """An exception for logs and error messages. Not ``repr``: aiohttp's response errors
    carry the request's headers (our ``Authorization``) in their ``request_info``."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{exc.__class__.__name__}(status={exc.status})"
    return f"{exc.__class__.__name__}({str(exc)[:200]})"


def _host_of(url: str) -> str:
    """A realm's host for logs: never its query or user info."""
    try:
        return (URL(url).raw_host or "")[:255]
    except URL_ERRORS:
        return "(unparsable)"


def _optional(name: str, value: str | None) -> dict[str, str]:
    return {name: value} if value is not None else {}


def _retry_after(value: str | None) -> float:
    if value and value.strip().isdigit():
        return float(value.strip())
    return 0.0
