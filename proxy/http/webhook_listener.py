"""The admission webhook's own listener: ``admission.listen``, TLS from ``admission.tls_cert``
and ``tls_key`` (reloaded when the files change), separate from the mirror's port so the API
server's traffic and the nodes' pulls never share a socket or a middleware chain.

``/mutate`` resolves tags of private upstreams with the mirror's credentials, so the port
must not answer just anyone who reaches it. With ``admission.client_ca`` the listener asks
for a client certificate (the API server presents one when its AdmissionConfiguration
names a kubeconfig with it: https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#authenticate-apiservers)
and ``/validate`` and ``/mutate`` answer only connections that presented one signed by that
CA; ``/healthz`` and ``/readyz`` stay open for the kubelet's probes, which carry none."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import structlog
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
            tls = ReloadingTLS(admission.tls_cert, admission.tls_key, logger, metrics, client_ca=admission.client_ca)
            if admission.client_ca is not None:
                app.middlewares.append(require_client_certificate)
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
            client_ca = tls is not None and tls.client_ca is not None
            logger.info("admission_listening", listen=f"{host}:{bound}", tls=tls is not None, client_ca=client_ca)
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


_OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: no certificate, no data


@web.middleware
async def require_client_certificate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """``403`` for a review from a connection without a verified client certificate (the TLS
    layer has already refused any certificate the CA did not sign)."""
    if request.path in _OPEN_PATHS or _verified_peer(request):
        return await handler(request)
    structlog.get_logger("pullgate.admission").warning(
        "admission_client_refused", remote=request.remote, path=request.path[:100], reason="no client certificate"
    )
    return web.json_response({"error": "a client certificate signed by admission.client_ca is required"}, status=403)


def _verified_peer(request: web.Request) -> bool:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return isinstance(ssl_object, ssl.SSLObject) and bool(ssl_object.getpeercert())
