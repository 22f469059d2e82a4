"""A server TLS context whose certificate can be replaced while the server runs, and which
can ask clients for a certificate (the admission webhook's ``admission.client_ca``).

cert-manager rotates the webhook's certificate by rewriting the mounted files. An
``SSLContext`` cannot safely be reloaded in place (a cert/key pair that fails to load would
leave it half-updated), so each change builds a fresh context, and the listening context's
``sni_callback`` hands every new handshake to the newest one (``SSLObject.context`` setter,
https://docs.python.org/3/library/ssl.html#ssl.SSLContext.sni_callback). OpenSSL calls the
callback for every ClientHello, with or without SNI. Established connections keep theirs.

With a client CA, every context asks for a client certificate (``CERT_OPTIONAL``): one that
is presented must chain to the CA or the handshake fails; whether one was presented at all
is for the application to require per path (the kubelet's probes carry none). The CA file
is watched and reloaded with the certificate: OpenSSL verifies the client's chain against
the store of the context the SNI callback switched to. The verify mode itself stays the
listening context's (it is copied into each connection before the callback), which is why
both are built alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from proxy.errors import ConfigError
from proxy.ops.filewatch import Stamp, stamps
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
        client_ca: Path | None = None,
    ) -> None:
        """``name``: the listener, for the config key in errors and the log event names
        (``admission``: ``admission.tls_cert``; ``mirror``: top-level ``tls_cert``).
        ``client_ca``: ask clients for a certificate signed by this CA (PEM)."""
        self.cert, self.key, self.logger, self.interval, self.name = cert, key, logger, interval, name
        self.client_ca = client_ca
        self._metrics = metrics
        self._stamp = self._files_stamp()
        key_name = "admission.tls_cert" if name == "admission" else "tls_cert"
        if client_ca is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{name}.client_ca: cannot load {client_ca}: {exc}") from exc
        try:
            self._current = self._build()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key_name}: cannot load {cert} / {key}: {exc}") from exc
        self.context = self._build()
        self.context.sni_callback = self._select

    def _files(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)

    def _files_stamp(self) -> tuple[Stamp, ...]:
        return stamps(*self._files())

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def _select(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        conn.context = self._current

    async def reload(self) -> bool:
        """Load the files now (in a thread: reading and parsing keys is slow); keep the
        current certificate if they do not load."""
        self._stamp = await asyncio.to_thread(self._files_stamp)
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
            if await asyncio.to_thread(self._files_stamp) != self._stamp:
                await self.reload()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReloadingTLS]:
        async with supervised(self._metrics, f"{self.name}_tls_watch", self.watch, self.logger):
            yield self
