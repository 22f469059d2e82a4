"""The peer endpoint: other replicas of the cluster stream a blob from the replica that is
downloading it (``proxy.registry.sharing``), or read one it holds on local disk.

``GET /_pullgate/peer/blobs/<digest>`` answers only what this replica has (a download in
progress or a blob on its disk) and never fetches anything; ``Range`` is honoured, so a
peer that lost its source mid-way resumes. The endpoint is not scoped to repositories, so
it is for replicas only: the caller presents the cluster's secret (kept in Redis, see
``Cluster.peer_secret``) as a bearer token; anything else is a 404, as if the path did
not exist. The bytes are checked by the receiving replica against the digest anyway.
"""

from __future__ import annotations

import asyncio
import hmac

from aiohttp import web

from proxy.errors import BlobUnknown, DigestInvalid
from proxy.http.appkeys import MIRROR
from proxy.http.pullapi import info, send_cached, stream_flight
from proxy.oci.digest import Digest
from proxy.registry.blobs import CachedBlob
from proxy.registry.cluster import PEER_PATH

_START_TIMEOUT = 60.0  # as long as a client of the holder waits for the upstream's first answer


async def peer_blob(request: web.Request) -> web.StreamResponse:
    mirror = request.app[MIRROR]
    secret = await mirror.cluster.peer_secret()
    offered = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if secret is None or not hmac.compare_digest(offered.encode(), secret.encode()):
        raise web.HTTPNotFound()
    try:
        digest = Digest.parse(request.match_info["digest"])
    except DigestInvalid:
        raise web.HTTPNotFound() from None
    details = info(request)
    details.reference, details.extra["peer"] = str(digest), request.remote or ""
    found = mirror.blobs.local(digest)
    if found is None:
        raise BlobUnknown(f"blob {digest} is not on this replica")
    headers = {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"}
    if isinstance(found, CachedBlob):
        details.cache = "hit"
        return await send_cached(request, mirror, found, headers)
    details.cache = "miss"
    # The holder takes its lease before the upstream answered: a peer may ask that early.
    async with asyncio.timeout(_START_TIMEOUT):
        await asyncio.shield(found.started)
    return await stream_flight(request, found, headers)


def add_peer_routes(app: web.Application) -> None:
    app.router.add_get(PEER_PATH + "{digest}", peer_blob, name="peer_blob")
