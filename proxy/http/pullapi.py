"""HTTP handlers for the OCI distribution-spec pull API
(https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pull).

The mirror is read-only: push and delete answer ``405 UNSUPPORTED``. Handlers translate
between HTTP and the mirror; errors propagate as exceptions and become spec-shaped JSON
bodies in ``proxy.http.app``'s middleware.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from io import FileIO
from typing import BinaryIO

from aiohttp import web
from multidict import CIMultiDict, istr
from prometheus_client import Counter

from proxy.access.control import ANONYMOUS, Access, Identity
from proxy.errors import (
    BlobUnknown,
    NameUnknown,
    RangeInvalid,
    Unauthorized,
    Unsupported,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.http.appkeys import ACCESS, CONFIG, MIRROR, PULL_POLICY, SENDER
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import INDEX_TYPES, acceptable, parse_accept, parse_manifest, pick_platform
from proxy.oci.reference import validate_tag
from proxy.ops.limits import FETCH_CLIENT, client_key
from proxy.registry.blobs import CachedBlob
from proxy.registry.download import FileWindow, Flight
from proxy.registry.manifests import Manifest
from proxy.registry.mirror import Mirror
from proxy.registry.routing import Route

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
X_REQUEST_ID = istr("X-Request-Id")  # case-insensitive once, not per lookup
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")
_MAX_PAGE = 10_000
_TLS_PIECE = 1 << 20  # bytes per send_timeout through a TLS connection
_HEADERS_REMEMBERED = 1024
# A manifest response's headers by (digest, media type, ns echoed): built once, copied into
# each response (cheaper than building them from a dict every time).
MANIFEST_HEADERS = web.AppKey("manifest_headers", dict[tuple[Digest, str, str | None], CIMultiDict[str]])


@dataclass(slots=True)
class RequestInfo:
    """One request's state, made once by the boundary's middleware: its id, the response
    whose headers went out (``prepared``), and what a handler learned, for the log event
    and metrics."""

    request_id: str = ""
    prepared: web.StreamResponse | None = None
    upstream: str | None = None
    repository: str | None = None
    reference: str | None = None
    cache: str | None = None
    bytes: int = 0
    extra: dict[str, str] = field(default_factory=dict)


INFO = web.RequestKey("pullgate_info", RequestInfo)


async def prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Send a streamed response's headers, the request id among them, and tell the
    boundary they are out (after this an error can only cut the connection short). The
    boundary's middleware adds the id to every response a handler returns; a response
    prepared here goes out before the handler returns. (No ``on_response_prepare`` signal
    for this: sending it cost every warm manifest request a coroutine call.)"""
    details = info(request)
    if details.request_id:
        response.headers[X_REQUEST_ID] = details.request_id
    details.prepared = response
    await response.prepare(request)


def info(request: web.Request) -> RequestInfo:
    try:
        return request[INFO]
    except KeyError:  # a handler run without the boundary (the middleware makes it first)
        found = request[INFO] = RequestInfo()
        return found


async def _route(request: web.Request) -> tuple[Mirror, Route]:
    """Route the request, then check the client may pull that repository — before any
    cache lookup or upstream contact, on the canonical (upstream, repository)."""
    access = request.app.get(ACCESS)
    identity = ANONYMOUS if access is None else await _identify(request, access)
    mirror = request.app[MIRROR]
    ns = request.query.get("ns") if request.query_string else None  # no query: nothing to parse
    route = mirror.router.route(request.match_info["name"], ns)
    details = info(request)
    details.upstream, details.repository = route.upstream, route.repository
    if access is not None:
        scope = f"repository:{request.match_info['name']}:pull"
        access.authorize(identity, route, access.challenge(token_realm(request), scope))
    # Upstream fetches this request starts are charged to its client (proxy.ops.limits).
    FETCH_CLIENT.set(client_key(request.remote))
    return mirror, route


async def _identify(request: web.Request, access: Access | None) -> Identity:
    if access is None:
        return ANONYMOUS
    challenge = access.challenge(token_realm(request))
    identity = await access.identify(request.headers.get("Authorization"), request.remote, challenge)
    if identity.name is not None:
        info(request).extra["user"] = identity.name
    return identity


def token_realm(request: web.Request) -> str:
    """Our token endpoint as the client reached us. The Host header is the client's own
    (it can only point itself elsewhere) but is checked so it cannot break out of the
    quoted challenge parameter; ``access.token_realm`` overrides it behind proxies."""
    host = request.host if _HOST_RE.match(request.host) else "localhost"
    return f"{request.scheme}://{host}/auth/token"


def _headers(route: Route, **extra: str) -> dict[str, str]:
    headers = dict(API_VERSION, **extra)
    if route.namespace is not None:
        # Distribution spec, "Proxying": echo the ns the client named.
        headers["OCI-Namespace"] = route.namespace
    return headers


async def api_base(request: web.Request) -> web.Response:
    # With access on, a request without credentials gets the Bearer challenge (as Docker Hub
    # does): clients decide from this ping whether to authenticate at all, and fetch an
    # anonymous token when they have no credentials (see proxy.access.tokens).
    access = request.app.get(ACCESS)
    await _identify(request, access)
    if access is not None and "Authorization" not in request.headers:
        raise Unauthorized("authentication required", headers=access.challenge(token_realm(request)))
    return web.json_response({}, headers=API_VERSION)


async def token(request: web.Request) -> web.Response:
    """``GET /auth/token`` (Docker token flow): the bearer token for the Basic credentials
    sent, or an anonymous one."""
    access = request.app.get(ACCESS)
    if access is None:
        raise NameUnknown("access control is off: there is no token endpoint")
    body = await access.issue(request.headers.get("Authorization"), request.remote)
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def manifest(request: web.Request) -> web.Response:
    mirror, route = await _route(request)
    reference = request.match_info["reference"]
    # A warm manifest is answered from memory without awaiting (validated when first seen).
    found = mirror.manifests.peek(route, reference)
    if found is None:
        if Digest.looks_like(reference):
            reference = str(Digest.parse(reference))
        else:
            validate_tag(reference)
        found = await mirror.manifest(route, reference)
    details = info(request)
    details.reference = reference
    pulled = [found.digest]
    if found.media_type in INDEX_TYPES and not acceptable(found.media_type, _accepted(request)):
        # A client that cannot take an index gets the linux/amd64 image, as Distribution does.
        child = pick_platform(parse_manifest(found.data, found.media_type))
        if child is not None:
            found = await mirror.manifest(route, str(child.digest))
            pulled.append(found.digest)
    pull_policy = request.app.get(PULL_POLICY)
    if pull_policy is not None:
        await pull_policy.check(route, reference, found)
    if request.method == "GET":  # a HEAD (containerd's resolve) is not a pull
        for digest in pulled:
            mirror.record_pull(route, digest)
    details.cache = found.result
    details.bytes = len(found.data) if request.method == "GET" else 0
    metrics = mirror.metrics
    (metrics.served_from_upstream if found.result == "miss" else metrics.served_from_cache).inc(details.bytes)
    return web.Response(body=found.data, headers=_manifest_headers(request.app[MANIFEST_HEADERS], route, found))


def _manifest_headers(
    known: dict[tuple[Digest, str, str | None], CIMultiDict[str]], route: Route, found: Manifest
) -> CIMultiDict[str]:
    key = (found.digest, found.media_type, route.namespace)
    headers = known.get(key)
    if headers is None:
        if len(known) >= _HEADERS_REMEMBERED:
            known.clear()
        extra = {"Docker-Content-Digest": str(found.digest), "Content-Type": found.media_type}
        headers = known[key] = CIMultiDict(_headers(route, **extra))
    return headers


def _accepted(request: web.Request) -> frozenset[str]:
    return parse_accept(",".join(request.headers.getall("Accept", ())))


async def blob(request: web.Request) -> web.StreamResponse:
    mirror, route = await _route(request)
    digest = Digest.parse(request.match_info["digest"])
    info(request).reference = str(digest)
    headers = _headers(route, **{"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"})
    if request.method == "HEAD":
        head = await mirror.blobs.head(route, digest)
        response = web.StreamResponse(headers=headers)
        if head.size is not None:
            response.content_length = head.size
        return response
    location = await mirror.blobs.redirect(route, digest)  # after _route's access check
    if location is not None:
        info(request).cache = "redirect"
        # 307 keeps the method and the client's Range; the URL carries its own signature and
        # expiry, so it must not be stored by anything between us and the client.
        del headers["Content-Type"]
        return web.Response(status=307, headers=dict(headers, Location=location, **{"Cache-Control": "no-store"}))
    found = await mirror.blobs.get(route, digest)
    if isinstance(found, CachedBlob):
        info(request).cache = "hit"
        return await send_cached(request, mirror, found, headers)
    info(request).cache = "miss"
    return await stream_flight(request, found, headers)


async def send_cached(
    request: web.Request, mirror: Mirror, blob: CachedBlob, headers: dict[str, str]
) -> web.StreamResponse:
    """A cached blob by ``sendfile``, honouring a single ``Range`` (containerd resumes with
    ``bytes=N-``). Sent in pieces, each bounded by ``limits.send_timeout`` like the
    streaming path's writes: a client that stops reading loses its connection and its
    file descriptor instead of holding both forever."""
    start, end, status = 0, blob.size, 200
    range_header = request.headers.get("Range")
    if range_header:
        start, end = _parse_range(range_header, blob.size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
    headers["Accept-Ranges"] = "bytes"
    try:
        file = await asyncio.to_thread(open, mirror.store.path(blob.digest), "rb")
    except FileNotFoundError:  # evicted since the lookup
        raise BlobUnknown(f"blob {blob.digest} is no longer cached; retry") from None
    try:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await prepare(request, response)
        if await _sendfile(request, file, start, end, mirror.metrics.served_from_cache):
            await response.write_eof()
    finally:
        file.close()
    return response


async def _sendfile(request: web.Request, file: BinaryIO | FileIO, start: int, end: int, served: Counter) -> bool:
    """Bytes ``[start, end)`` of ``file`` to the client (``proxy.http.sendfile``: off the
    event loop), each piece bounded by ``limits.send_timeout``; False when the client was
    cut off for taking nothing that long."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    send_timeout = request.app[CONFIG].limits.send_timeout
    details = info(request)

    def sent(count: int) -> None:
        details.bytes += count
        served.inc(count)

    try:
        sender = request.app[SENDER]
        if sender.supports(transport):
            await sender.send(transport, file.fileno(), start, end - start, timeout=send_timeout, on_sent=sent)
        else:
            await _sendfile_tls(transport, file, start, end, send_timeout, sent)
    except TimeoutError:
        details.extra["aborted"] = "SEND_TIMEOUT"
        transport.abort()
        return False
    except ConnectionError:
        # Part of the body went out: the connection must not carry another response.
        transport.abort()
        raise
    except EOFError as exc:  # the file is shorter than it was said to be: never pad, never go on
        raise UpstreamUnavailable(f"blob file too short: {exc}") from None
    return True


async def _sendfile_tls(
    transport: asyncio.WriteTransport,
    file: BinaryIO | FileIO,
    start: int,
    end: int,
    send_timeout: float,
    sent: Callable[[int], None],
) -> None:
    """TLS encrypts in user space: asyncio reads the file and writes through the TLS
    transport (reading at the file's position: only for a file object of this response)."""
    loop = asyncio.get_running_loop()
    for offset in range(start, end, _TLS_PIECE):
        count = min(_TLS_PIECE, end - offset)
        async with asyncio.timeout(send_timeout):
            if await loop.sendfile(transport, file, offset, count) != count:
                raise EOFError(f"file ended before byte {offset + count}")
        sent(count)


async def stream_flight(request: web.Request, flight: Flight, headers: dict[str, str]) -> web.StreamResponse:
    """Stream a blob that is still downloading, honouring a single ``Range``. Over a plain
    socket the bytes go by ``sendfile`` from the download's file as they are written
    (``FileWindow``, the last one once verified); over TLS they come as bytes."""
    start, end, status = 0, flight.size, 200
    range_header = request.headers.get("Range")
    if range_header and flight.size is not None:
        start, end = _parse_range(range_header, flight.size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{flight.size}"
    response = web.StreamResponse(status=status, headers=headers)
    if end is not None:
        response.content_length = end - start
    await prepare(request, response)
    served = request.app[MIRROR].metrics.served_from_upstream
    send_timeout = request.app[CONFIG].limits.send_timeout
    details = info(request)
    # TLS cannot sendfile (its fallback would read through the shared descriptor's
    # position); chunked encoding (unknown length) frames every write.
    transport = request.transport
    windows = end is not None and transport is not None and request.app[SENDER].supports(transport)
    try:
        async with aclosing(flight.read(start, end, windows=windows)) as pieces:
            async for piece in pieces:
                if isinstance(piece, FileWindow):
                    file = FileIO(piece.fd, closefd=False)
                    if not await _sendfile(request, file, piece.offset, piece.offset + piece.count, served):
                        return response
                    continue
                # A client that takes no byte for send_timeout is cut off. (A slow one only
                # slows itself: the download writes to disk whatever clients do.)
                async with asyncio.timeout(send_timeout):
                    await response.write(piece)
                details.bytes += len(piece)
                served.inc(len(piece))
    except (UpstreamError, TimeoutError) as exc:
        # Headers are sent; the only honest signal left is a connection closed short of
        # Content-Length, so the client discards what it got.
        details.extra["aborted"] = exc.code if isinstance(exc, UpstreamError) else "SEND_TIMEOUT"
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


def _parse_range(header: str, size: int) -> tuple[int, int]:
    match = _RANGE_RE.match(header.strip())
    if match is None:
        raise RangeInvalid(f"unsupported Range {header[:100]!r}", headers={"Content-Range": f"bytes */{size}"})
    start = int(match.group(1))
    end = int(match.group(2)) + 1 if match.group(2) else size
    if start >= size or end <= start:
        raise RangeInvalid(f"Range {header[:100]!r} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size)


async def tags_list(request: web.Request) -> web.Response:
    mirror, route = await _route(request)
    query = {k: v for k, v in request.query.items() if k in ("n", "last")}
    if "n" in query and (not query["n"].isdigit() or int(query["n"]) > _MAX_PAGE):
        query["n"] = str(_MAX_PAGE)
    if "last" in query:
        validate_tag(query["last"])
    response = await mirror.tags_list(route, query)
    headers = _headers(route, **{"Content-Type": "application/json"})
    link = response.headers.get("Link")
    if link and response.status == 200:
        # Upstream's Link names its own repository path; point it back at ours.
        headers["Link"] = link.replace(f"/v2/{route.repository}/", f"/v2/{request.match_info['name']}/", 1)
    if response.status == 404:
        raise NameUnknown(f"repository {route.repository} is unknown upstream")
    if response.status != 200:
        raise UpstreamError(f"upstream answered {response.status} for tags/list")
    return web.Response(body=response.body, headers=headers)


async def referrers(request: web.Request) -> web.Response:
    mirror, route = await _route(request)
    digest = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    body, filtered, _ = await mirror.referrers_index(route, digest, artifact_type)
    headers = _headers(route, **{"Content-Type": "application/vnd.oci.image.index.v1+json"})
    if filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=body, headers=headers)


async def unsupported(request: web.Request) -> web.Response:
    raise Unsupported("pullgate is a read-only mirror: push and delete are not supported")


def add_routes(app: web.Application) -> None:
    app[MANIFEST_HEADERS] = {}
    name = r"{name:[^?#]+?}"
    app.router.add_get("/v2/", api_base, name="base")
    app.router.add_get("/auth/token", token, name="token")
    app.router.add_get(rf"/v2/{name}/manifests/{{reference}}", manifest, name="manifest")
    app.router.add_get(rf"/v2/{name}/blobs/{{digest}}", blob, name="blob")
    app.router.add_get(rf"/v2/{name}/tags/list", tags_list, name="tags")
    app.router.add_get(rf"/v2/{name}/referrers/{{digest}}", referrers, name="referrers")
    for method in ("PUT", "POST", "PATCH", "DELETE"):
        app.router.add_route(method, r"/v2/{tail:.*}", unsupported, name=f"unsupported_{method.lower()}")
