"""The mirror's aiohttp application: wiring (the error boundary is ``proxy.http.boundary``),
health and metrics endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.access.control import Access
from proxy.config.settings import Config, LimitsConfig
from proxy.http.appkeys import (
    ACCESS,
    CONFIG,
    FETCH_LIMITER,
    LIFECYCLE,
    METRICS,
    MIRROR,
    POLICIES,
    PULL_POLICY,
    SENDER,
    TRUST_REFRESH,
    TRUST_ROOTS,
    Lifecycle,
)
from proxy.http.boundary import RequestIds, request_middleware
from proxy.http.peerapi import add_peer_routes
from proxy.http.pullapi import add_routes
from proxy.http.sendfile import FileSender
from proxy.http.trustrefresh import refresher
from proxy.http.webhook_listener import serve_webhook
from proxy.ops.limits import FetchLimiter
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicyStore
from proxy.policy.pulltime import PullPolicy
from proxy.registry.mirror import Mirror
from proxy.trust.trustroot import RootHolder


def create_app(config: Config, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application(
        middlewares=[request_middleware(RequestIds(), config.limits.max_url_length)],
        client_max_size=64 << 10,
        handler_args=handler_args(config.limits),
    )
    app[CONFIG] = config
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics(registry if registry is not None else CollectorRegistry())
    if config.access.enabled:
        app[ACCESS] = Access(config.access, app[METRICS])  # reads the credential files: ConfigError
        app.cleanup_ctx.append(_access_ctx)
    app[FETCH_LIMITER] = FetchLimiter(
        config.limits.upstream_fetches, config.limits.upstream_fetches_per_client, app[METRICS]
    )
    app[TRUST_ROOTS] = RootHolder()
    if config.trust.tuf.url is not None:  # a bad anchor file is a ConfigError now, not at the first refresh
        app[TRUST_REFRESH] = refresher(config, app[TRUST_ROOTS], app[METRICS], structlog.get_logger("pullgate.trust"))
    app.cleanup_ctx.append(_sender_ctx)
    app.cleanup_ctx.append(_mirror_ctx)
    app.cleanup_ctx.append(_trust_ctx)
    app.cleanup_ctx.append(_policies_ctx)
    add_routes(app)
    if config.coordination.type == "redis":  # replicas stream blobs from each other
        add_peer_routes(app)
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


async def _sender_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SENDER] = sender = FileSender()
    try:
        yield
    finally:
        await sender.close()


async def _mirror_ctx(app: web.Application) -> AsyncIterator[None]:
    # Fetches for mirror clients are limited; the CLI tools' own Mirrors are not.
    mirror = Mirror(app[CONFIG], app[METRICS], limiter=app[FETCH_LIMITER])
    try:
        await mirror.open()
        app[MIRROR] = mirror
        yield
    finally:
        await mirror.close()


async def _access_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the credential files for as long as the app runs."""
    async with app[ACCESS].running():
        yield


async def _trust_ctx(app: web.Application) -> AsyncIterator[None]:
    """The TUF refresh of the default Sigstore trusted root, when ``trust.tuf.url`` is set."""
    task = app.get(TRUST_REFRESH)
    if task is None:
        yield
        return
    async with task.running(app[METRICS]):
        yield


async def _policies_ctx(app: web.Application) -> AsyncIterator[None]:
    """One policy set for the webhook and (with ``mirror.enforce_policies``) the mirror;
    the webhook listener runs alongside the mirror's when ``admission.enabled``."""
    config, metrics = app[CONFIG], app[METRICS]
    log = structlog.get_logger("pullgate.admission")
    store = PolicyStore(config.policies, metrics, log, roots=app[TRUST_ROOTS])
    async with store.running():
        app[POLICIES] = store
        if config.mirror.enforce_policies:
            app[PULL_POLICY] = PullPolicy(app[MIRROR], store, config.admission.deadline)
        if not config.admission.enabled:
            yield
            return
        async with serve_webhook(config, app[MIRROR], metrics, log, policies=store, content=app[MIRROR]):
            yield


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    mirror, policies = request.app.get(MIRROR), request.app.get(POLICIES)
    checks = {
        "serving": not request.app[LIFECYCLE].draining,
        "config": True,
        "cache_writable": mirror is not None and await mirror.ready(),
        "policies_loaded": bool(policies and policies.ready),
    }
    ready = all(checks.values())
    request.app[METRICS].ready.set(1 if ready else 0)
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
