"""The admission webhook's own listener: ``admission.listen``, TLS from ``admission.tls_cert``
and ``tls_key`` (reloaded when the files change), separate from the mirror's port so the API
server's traffic and the nodes' pulls never share a socket or a middleware chain."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from structlog.typing import FilteringBoundLogger

from proxy.admission.webhook import create_webhook_app
from proxy.config.settings import Config
from proxy.http.boundary import webhook_boundary
from proxy.http.listen import bind, close_all
from proxy.http.tls import ReloadingTLS
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicyStore
from proxy.policy.evaluation import ContentProvider, TagResolver


@dataclass(frozen=True, slots=True)
class WebhookServer:
    host: str
    port: int
    tls: ReloadingTLS | None  # None: plain HTTP


@contextlib.asynccontextmanager
async def run_webhook(
    app: web.Application, config: Config, logger: FilteringBoundLogger, metrics: Metrics
) -> AsyncIterator[WebhookServer]:
    """Serve ``app`` on ``admission.listen`` (TLS when cert files are configured) until exit.
    The address is bound first: ``ListenFailed`` naming ``admission.listen`` when it cannot be."""
    admission = config.admission
    host, port = admission.listen
    sockets = await bind("admission.listen", host, port)
    try:
        tls = None
        if admission.tls_cert is not None and admission.tls_key is not None:
            tls = ReloadingTLS(admission.tls_cert, admission.tls_key, logger, metrics)
        else:
            logger.warning(
                "admission_tls_disabled",
                listen=f"{host}:{port}",
                detail="serving plain HTTP; the API server requires HTTPS",
            )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_grace)
        await runner.setup()
        try:
            for sock in sockets:
                await web.SockSite(runner, sock, ssl_context=tls.context if tls else None).start()
            bound = sockets[0].getsockname()[1]
            logger.info("admission_listening", listen=f"{host}:{bound}", tls=tls is not None)
            async with tls.running() if tls else contextlib.nullcontext():
                yield WebhookServer(host, bound, tls)
        finally:
            await runner.cleanup()
    finally:
        close_all(sockets)


@contextlib.asynccontextmanager
async def serve_webhook(
    config: Config,
    resolver: TagResolver,
    metrics: Metrics,
    logger: FilteringBoundLogger,
    *,
    policies: PolicyStore | None = None,
    content: ContentProvider | None = None,
) -> AsyncIterator[WebhookServer]:
    """``create_webhook_app`` behind the last-resort handler (``proxy.http.boundary``) +
    ``run_webhook``: for the daemon's ``cleanup_ctx``."""
    app = create_webhook_app(
        config, resolver, metrics, logger, policies=policies, content=content,
        middlewares=(webhook_boundary(metrics, logger),),
    )  # fmt: skip
    async with run_webhook(app, config, logger, metrics) as server:
        yield server
