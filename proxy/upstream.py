"""The client for one upstream registry: bearer-token and Basic auth, bounded retries with
backoff, ``429``/``Retry-After``, credential-free redirects, timeouts on every call, and
metrics for all of it.

Only the configured upstream URL is ever contacted, plus token realms on allowed hosts and
blob redirects to https hosts (CDNs) — never with our registry credentials attached.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import TimeoutConfig, UpstreamConfig
from proxy.errors import (
    ManifestInvalid,
    UpstreamDenied,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from proxy.metrics import Metrics
from proxy.tokens import Challenge, TokenCache, parse_challenge

# Token hosts of the big public registries (their realms live on other hosts than the API).
WELL_KNOWN_AUTH_HOSTS = ("auth.docker.io", "ghcr.io", "quay.io", "gcr.io", "public.ecr.aws", "mcr.microsoft.com")
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
        self, config: UpstreamConfig, session: aiohttp.ClientSession, timeouts: TimeoutConfig, metrics: Metrics
    ) -> None:
        self.name = config.name
        self.config = config
        self._session = session
        self._timeouts = timeouts
        self._metrics = metrics
        self._tokens = TokenCache()
        self._challenge: Challenge | None = None
        self._host = urlsplit(config.url).hostname or ""
        self._auth_hosts = set(config.auth_hosts) or {self._host, *WELL_KNOWN_AUTH_HOSTS}
        self._log = structlog.get_logger("pullgate.upstream").bind(upstream=self.name)

    # --- public API ---------------------------------------------------------------------
    async def fetch(
        self, method: str, repository: str, path: str, *, headers: Mapping[str, str] | None = None, max_size: int
    ) -> UpstreamResponse:
        """A whole (small) response: manifests, tag lists, referrers."""
        timeout = aiohttp.ClientTimeout(total=self._timeouts.manifest, connect=self._timeouts.connect)
        response = await self._send(method, repository, path, headers, timeout)
        try:
            body = await _read_limited(response, max_size) if method != "HEAD" else b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.upstream_errors.labels(self.name, "read").inc()
            raise UpstreamUnavailable(f"upstream {self.name}: reading response failed: {exc!r}") from exc
        finally:
            response.release()
        return UpstreamResponse(response.status, response.headers, body)

    @asynccontextmanager
    async def open(
        self, method: str, repository: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming response (blobs): no total timeout, but connect and per-read ones."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeouts.connect, sock_read=self._timeouts.read)
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
                self._log.warning("upstream_request_failed", method=method, url=url, error=repr(exc), attempt=attempt)
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
        auth = await self._authorization(repository, self._challenge, timeout)
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
            self._challenge = challenge
            auth = await self._authorization(repository, challenge, timeout, force=True)
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
        for _ in range(_MAX_REDIRECTS):
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise UpstreamError(f"upstream {self.name} redirected without a Location")
            target = urljoin(str(response.url), location)
            self._check_redirect(target)
            plain = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            response = await self._session.request(
                method, target, headers=plain, allow_redirects=False, timeout=timeout
            )
            if response.status not in _REDIRECTS:
                return response
        response.release()
        raise UpstreamError(f"upstream {self.name}: too many redirects")

    def _check_redirect(self, target: str) -> None:
        parts = urlsplit(target)
        if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname == self._host):
            return
        self._metrics.upstream_errors.labels(self.name, "redirect_refused").inc()
        raise UpstreamError(f"upstream {self.name} redirected to a disallowed location")

    async def _authorization(
        self, repository: str, challenge: Challenge | None, timeout: aiohttp.ClientTimeout, *, force: bool = False
    ) -> str | None:
        if challenge is None:
            return None
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
        if urlsplit(realm).hostname not in self._auth_hosts or urlsplit(realm).scheme not in ("http", "https"):
            self._metrics.upstream_errors.labels(self.name, "realm_refused").inc()
            raise UpstreamDenied(f"upstream {self.name}: token realm host is not allowed (auth_hosts)")
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        try:
            async with self._session.get(
                realm,
                params=params,
                headers=_optional("Authorization", self._basic()),
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    self._metrics.upstream_errors.labels(self.name, "auth").inc()
                    raise UpstreamDenied(f"upstream {self.name}: token endpoint answered {response.status}")
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._metrics.upstream_errors.labels(self.name, "auth").inc()
            raise UpstreamUnavailable(f"upstream {self.name}: token request failed: {exc.__class__.__name__}") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamDenied(f"upstream {self.name}: token endpoint returned no token")
        expires_in = data.get("expires_in")
        self._tokens.put(
            realm, service, scope, token, float(expires_in) if isinstance(expires_in, int | float) else None
        )
        return token

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


def _optional(name: str, value: str | None) -> dict[str, str]:
    return {name: value} if value is not None else {}


def _retry_after(value: str | None) -> float:
    if value and value.strip().isdigit():
        return float(value.strip())
    return 0.0
