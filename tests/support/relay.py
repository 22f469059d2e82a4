"""An HTTP relay in front of a real registry, for faults the registry itself will not
produce: throttled transfers (to see streaming before completion) and flipped bytes in
blob bodies (to see digest verification). Everything else passes through unchanged."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


@dataclass
class Relay:
    target: str  # e.g. http://127.0.0.1:5001
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks of blob bodies
    corrupt: bool = False  # flip the first byte of every blob body
    blob_gets: int = 0
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        is_blob = "/blobs/" in request.path and request.method == "GET"
        self.blob_gets += is_blob
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=120),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers[key] = value
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            first = True
            async for chunk in upstream.content.iter_chunked(1 << 16):
                if is_blob and self.corrupt and first and chunk:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                first = False
                await response.write(chunk)
                if is_blob and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await response.write_eof()
            return response
