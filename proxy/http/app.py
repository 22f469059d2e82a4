"""The mirror's aiohttp application: wiring, the error boundary, per-request logs and
metrics, health and metrics endpoints."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.access.control import Access
from proxy.config.settings import Config, LimitsConfig
from proxy.errors import NameInvalid, NameUnknown, PullgateError, Unsupported
from proxy.http.appkeys import (
    ACCESS,
    CONFIG,
    FETCH_LIMITER,
    LIFECYCLE,
    METRICS,
    MIRROR,
    POLICIES,
    PULL_POLICY,
    Lifecycle,
)
from proxy.http.pullapi import API_VERSION, add_routes, info
from proxy.http.webhook_listener import serve_webhook
from proxy.ops.limits import FetchLimiter
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicyStore
from proxy.policy.pulltime import PullPolicy
from proxy.registry.mirror import Mirror


def create_app(config: Config, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application(
        middlewares=[request_middleware], client_max_size=64 << 10, handler_args=handler_args(config.limits)
    )
    app[CONFIG] = config
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics(registry if registry is not None else CollectorRegistry())
    if config.access.enabled:
        app[ACCESS] = Access(config.access, app[METRICS])  # reads the credential files: ConfigError
    app[FETCH_LIMITER] = FetchLimiter(
        config.limits.upstream_fetches, config.limits.upstream_fetches_per_client, app[METRICS]
    )
    app.cleanup_ctx.append(_mirror_ctx)
    app.cleanup_ctx.append(_policies_ctx)
    add_routes(app)
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
    return app


def handler_args(limits: LimitsConfig) -> dict[str, float]:
    """aiohttp's per-connection limits (``RequestHandler``): a request line longer than the
    URL limit, a header field past ``max_header_size`` or too many headers is a 400 from the
    parser, before any handler runs. The keep-alive timer also runs while a request's
    headers trickle in, so a slowloris connection is closed after ``idle_timeout``."""
    return {
        "max_line_size": limits.max_url_length + 64,  # "GET " + URL + " HTTP/1.1"
        "max_field_size": limits.max_header_size,
        "max_headers": limits.max_headers,
        "keepalive_timeout": limits.idle_timeout,
    }


async def _mirror_ctx(app: web.Application) -> AsyncIterator[None]:
    mirror = Mirror(app[CONFIG], app[METRICS])
    await mirror.open()
    for client in mirror.upstreams.values():
        # Fetches for mirror clients are limited; the CLI tools' own Mirrors are not.
        client.limiter = app[FETCH_LIMITER]
    app[MIRROR] = mirror
    yield
    await mirror.close()


async def _policies_ctx(app: web.Application) -> AsyncIterator[None]:
    """One policy set for the webhook and (with ``mirror.enforce_policies``) the mirror;
    the webhook listener runs alongside the mirror's when ``admission.enabled``."""
    config, metrics = app[CONFIG], app[METRICS]
    log = structlog.get_logger("pullgate.admission")
    store = PolicyStore(config.policies, metrics, log)
    async with store.running():
        app[POLICIES] = store
        if config.mirror.enforce_policies:
            app[PULL_POLICY] = PullPolicy(app[MIRROR], store, config.admission.deadline)
        if not config.admission.enabled:
            yield
            return
        async with serve_webhook(config, app[MIRROR], metrics, log, policies=store, content=app[MIRROR]):
            yield


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The boundary: every error becomes a spec-shaped JSON body here, and every request
    leaves one ``http_request`` log event and its metrics."""
    started = time.monotonic()
    request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex[:16]
    endpoint = "other"
    try:
        _check_path(request)
        if request.match_info.route.name:
            endpoint = request.match_info.route.name
        response = await handler(request)
    except PullgateError as exc:
        response = _error_response(exc)
    except web.HTTPException as exc:
        # Unrouted paths under /v2/ still get spec-shaped error bodies.
        if not request.path.startswith("/v2/") or exc.status not in (404, 405):
            raise
        if request.method in ("GET", "HEAD"):
            response = _error_response(NameUnknown("no such endpoint"))
        else:
            response = _error_response(Unsupported("pullgate is a read-only mirror"))
    response.headers["X-Request-Id"] = request_id
    _observe(request, response, endpoint, request_id, time.monotonic() - started)
    return response


def _check_path(request: web.Request) -> None:
    """Reject encoded separators and dot segments before routing: a repository name must
    never be able to climb out of its place or smuggle a '/'."""
    if not request.path.startswith("/v2/"):
        return
    raw = request.raw_path.partition("?")[0]
    too_long = len(request.raw_path) > request.app[CONFIG].limits.max_url_length
    if too_long or "%" in raw or "/../" in raw + "/" or "/./" in raw or "//" in raw:
        raise NameInvalid("invalid characters or path segments in the request path")


def _error_response(exc: PullgateError) -> web.Response:
    headers = dict(API_VERSION, **exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", 'Basic realm="pullgate"')
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _observe(
    request: web.Request, response: web.StreamResponse, endpoint: str, request_id: str, elapsed: float
) -> None:
    metrics = request.app[METRICS]
    metrics.requests.labels(endpoint, request.method, str(response.status)).inc()
    metrics.request_seconds.labels(endpoint).observe(elapsed)
    details = info(request)
    if endpoint in ("metrics", "healthz", "readyz"):
        return
    structlog.get_logger("pullgate.http").info(
        "http_request",
        request_id=request_id,
        method=request.method,
        endpoint=endpoint,
        status=response.status,
        upstream=details.upstream,
        repository=details.repository,
        reference=details.reference,
        cache=details.cache,
        bytes=details.bytes,
        duration_ms=round(elapsed * 1000, 2),
        remote=request.remote,
        user_agent=request.headers.get("User-Agent", "")[:100],
        **details.extra,
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    mirror, policies = request.app.get(MIRROR), request.app.get(POLICIES)
    checks = {
        "serving": not request.app[LIFECYCLE].draining,
        "config": True,
        "cache_writable": bool(mirror and mirror.ready()),
        "policies_loaded": bool(policies and policies.ready),
    }
    ready = all(checks.values())
    request.app[METRICS].ready.set(1 if ready else 0)
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
