"""A server TLS context whose certificate can be replaced while the server runs.

cert-manager rotates the webhook's certificate by rewriting the mounted files. An
``SSLContext`` cannot safely be reloaded in place (a cert/key pair that fails to load would
leave it half-updated), so each change builds a fresh context, and the listening context's
``sni_callback`` hands every new handshake to the newest one (``SSLObject.context`` setter,
https://docs.python.org/3/library/ssl.html#ssl.SSLContext.sni_callback). OpenSSL calls the
callback for every ClientHello, with or without SNI. Established connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from proxy.errors import ConfigError
from proxy.ops.filewatch import stamps
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import supervised


class ReloadingTLS:
    """``context`` goes to the listener; ``running()`` watches the files and swaps certs."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        logger: FilteringBoundLogger,
        metrics: Metrics,
        *,
        interval: float = 10.0,
        name: str = "admission",
    ) -> None:
        """``name``: the listener, for the config key in errors and the log event names
        (``admission``: ``admission.tls_cert``; ``mirror``: top-level ``tls_cert``)."""
        self.cert, self.key, self.logger, self.interval, self.name = cert, key, logger, interval, name
        self._metrics = metrics
        self._stamp = stamps(cert, key)
        key_name = "admission.tls_cert" if name == "admission" else "tls_cert"
        try:
            self._current = self._build()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key_name}: cannot load {cert} / {key}: {exc}") from exc
        self.context = self._build()
        self.context.sni_callback = self._select

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context

    def _select(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        conn.context = self._current

    async def reload(self) -> bool:
        """Load the files now (in a thread: reading and parsing keys is slow); keep the
        current certificate if they do not load."""
        self._stamp = await asyncio.to_thread(stamps, self.cert, self.key)
        try:
            self._current = await asyncio.to_thread(self._build)
        except (OSError, ssl.SSLError) as exc:
            self.logger.error(f"{self.name}_tls_reload_failed", cert=str(self.cert), error=str(exc))
            return False
        self.logger.info(f"{self.name}_tls_reloaded", cert=str(self.cert))
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if await asyncio.to_thread(stamps, self.cert, self.key) != self._stamp:
                await self.reload()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReloadingTLS]:
        async with supervised(self._metrics, f"{self.name}_tls_watch", self.watch, self.logger):
            yield self
