"""The error boundary of both listeners: where exceptions become responses.

Mirror (``request_middleware``): a ``PullgateError`` becomes its distribution-spec JSON
error body; anything else is a bug and becomes ``500 UNKNOWN`` with the request id, one
``unhandled_error`` event with the traceback and ``pullgate_unhandled_errors_total``. Every
request, whatever happened, leaves one ``http_request`` event and its request metrics.
A client that goes away mid-response is not an error: its ``http_request`` event says
``aborted: CLIENT_GONE`` (status 499 when nothing was sent yet, nginx's convention); a
handler cancelled at shutdown says ``aborted: CANCELLED``.

Webhook (``webhook_boundary``): the handlers answer their own errors; what escapes them
becomes a JSON error body (never aiohttp's plain-text 500), counted as an ``error`` outcome,
so the API server applies the webhook's ``failurePolicy``.

Once a response's headers are out (streamed blobs) no error body can follow: the
connection is cut short of ``Content-Length`` instead, so the client discards what it got.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
import uuid
from collections.abc import Callable
from functools import partial

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from structlog.typing import FilteringBoundLogger

from proxy.errors import NameInvalid, NameUnknown, PullgateError, Unsupported
from proxy.http.appkeys import METRICS
from proxy.http.pullapi import API_VERSION, INFO, X_REQUEST_ID, RequestInfo, info
from proxy.ops.logs import emit_info
from proxy.ops.metrics import Metrics

CLIENT_CLOSED = 499  # the client left before any response was sent


class InternalError(PullgateError):
    """An unexpected exception, as the client sees it: no details beyond the request id."""


class RequestIds:
    """Request ids, unique per process and cheap (no ``uuid4`` per request): a random
    prefix drawn once, then a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


def request_middleware(ids: RequestIds, max_url_length: int) -> Middleware:
    """The mirror's boundary (see the module docstring); ``ids`` names the requests whose
    client sent no ``X-Request-Id`` of its own. Runs on every request: one ``RequestInfo``
    carries the request's state (no further lookups in the request's mapping)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        details = request[INFO] = RequestInfo(request.headers.get(X_REQUEST_ID, "")[:64] or ids.next())
        endpoint = "other"
        try:
            _check_path(request, max_url_length)
            endpoint = request.match_info.route.name or endpoint
            response = await handler(request)
        except PullgateError as exc:
            response = _sent_or(request, exc.code, partial(error_response, exc))
        except web.HTTPException as exc:
            # Unrouted paths under /v2/ still get spec-shaped error bodies.
            if not request.path.startswith("/v2/") or exc.status not in (404, 405):
                exc.headers[X_REQUEST_ID] = details.request_id  # aiohttp's own answer carries it too
                _observe(request, details, exc.status, endpoint, time.monotonic() - started)
                raise
            if request.method in ("GET", "HEAD"):
                response = error_response(NameUnknown("no such endpoint"))
            else:
                response = error_response(Unsupported("pullgate is a read-only mirror"))
        except ConnectionError as exc:
            gone = _gone(request) or details.prepared is not None  # a write to a client that left
            response = _client_gone(request) if gone else _unhandled(request, exc, endpoint)
        except asyncio.CancelledError:
            # The server cancels a handler whose client left (handler_cancellation) or that
            # outlived the shutdown grace: the request still leaves its event.
            details.extra.setdefault("aborted", "CLIENT_GONE" if _gone(request) else "CANCELLED")
            status = details.prepared.status if details.prepared is not None else CLIENT_CLOSED
            _observe(request, details, status, endpoint, time.monotonic() - started)
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug must still answer in the spec's terms
            response = _unhandled(request, exc, endpoint)
        response.headers[X_REQUEST_ID] = details.request_id
        status = details.prepared.status if details.prepared is not None else response.status
        _observe(request, details, status, endpoint, time.monotonic() - started)
        return response

    return middleware


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _sent_or(request: web.Request, reason: str, respond: Callable[[], web.StreamResponse]) -> web.StreamResponse:
    """The response already on the wire, cut off (``reason`` goes to the log), or a fresh one."""
    prepared = info(request).prepared
    if prepared is not None:
        info(request).extra.setdefault("aborted", reason)
        if request.transport is not None:
            request.transport.abort()
        return prepared
    return respond()


def _client_gone(request: web.Request) -> web.StreamResponse:
    details = info(request)
    details.extra.setdefault("aborted", "CLIENT_GONE")
    return details.prepared if details.prepared is not None else web.Response(status=CLIENT_CLOSED)


def _unhandled(request: web.Request, exc: BaseException, endpoint: str) -> web.StreamResponse:
    request_id = info(request).request_id
    request.app[METRICS].unhandled_errors.labels("mirror").inc()
    structlog.get_logger("pullgate.http").error(
        "unhandled_error", request_id=request_id, method=request.method, endpoint=endpoint, exc_info=exc
    )
    message = f"internal error (request id {request_id}); the mirror's log has the details"
    return _sent_or(request, "INTERNAL_ERROR", partial(error_response, InternalError(message)))


def _check_path(request: web.Request, max_url_length: int) -> None:
    """Reject encoded separators and dot segments before routing: a repository name must
    never be able to climb out of its place or smuggle a '/'."""
    if not request.path.startswith("/v2/"):
        return
    raw_path = request.raw_path
    raw = raw_path.partition("?")[0]
    too_long = len(raw_path) > max_url_length
    if too_long or "%" in raw or "/../" in raw + "/" or "/./" in raw or "//" in raw:
        raise NameInvalid("invalid characters or path segments in the request path")


def error_response(exc: PullgateError) -> web.Response:
    headers = dict(API_VERSION, **exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", 'Basic realm="pullgate"')
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _observe(request: web.Request, details: RequestInfo, status: int, endpoint: str, elapsed: float) -> None:
    request.app[METRICS].request_done(endpoint, request.method, status, elapsed)
    if endpoint in ("metrics", "healthz", "readyz"):
        return
    emit_info("http_request", partial(_request_line, request, details, status, endpoint, elapsed))


def _request_line(
    request: web.Request, details: RequestInfo, status: int, endpoint: str, elapsed: float
) -> dict[str, object]:
    return {
        "request_id": details.request_id,
        "method": request.method,
        "endpoint": endpoint,
        "status": status,
        "upstream": details.upstream,
        "repository": details.repository,
        "reference": details.reference,
        "cache": details.cache,
        "bytes": details.bytes,
        "duration_ms": round(elapsed * 1000, 2),
        "remote": request.remote,
        "user_agent": request.headers.get("User-Agent", "")[:100],
        **details.extra,
    }


# --- the webhook -------------------------------------------------------------------------
_REVIEW_ENDPOINTS = frozenset({"validate", "mutate"})


def webhook_boundary(metrics: Metrics, logger: FilteringBoundLogger) -> Middleware:
    """The webhook listener's last resort (see the module docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            return await handler(request)
        except (web.HTTPException, ConnectionError):
            raise  # aiohttp's own answers (404, 405), and a caller that left: nothing to say
        except Exception as exc:  # the last resort: never aiohttp's plain-text 500
            request_id = uuid.uuid4().hex[:16]
            endpoint = request.path.strip("/")
            message = f"internal error (request id {request_id}); the webhook's log has the details"
            metrics.unhandled_errors.labels("admission").inc()
            logger.error(
                "unhandled_error", request_id=request_id, method=request.method, path=request.path, exc_info=exc
            )
            if endpoint in _REVIEW_ENDPOINTS:  # what the webhook's own errors leave behind
                metrics.admission_reviews.labels(endpoint=endpoint, outcome="error").inc()
                metrics.admission_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)
                logger.warning("admission_review_rejected", endpoint=endpoint, status=500, error=message)
            return web.json_response(InternalError(message).body(), status=500, headers={"X-Request-Id": request_id})

    return middleware
