"""The shared tier: what several replicas of pullgate share, and whether each part answers.

``storage: {type: s3}`` gives every replica the same object store (``ObjectStore``): a blob
downloaded by one replica is read by the others from there. ``coordination: {type:
redis}`` adds a ``Coordinator``: one lease per blob digest, so one replica in the cluster
downloads it while the others stream it from that replica's peer endpoint
(``advertise_url``); tags, proofs and pull times are shared through it too.

Either part may fail at any time. Callers treat a failure as "work alone" (Redis) or "pass
through and keep a local copy" (object store), and report it here: the gauges
``pullgate_coordination_up`` and ``pullgate_object_store_up`` follow what the last call saw,
and a background check (``watch``) keeps them true while nothing else is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Awaitable, Callable

import aiohttp
import structlog

from proxy.config.settings import Config
from proxy.ops.metrics import Metrics
from proxy.registry.coordination import CoordinationUnavailable, Coordinator
from proxy.registry.objectstore import ObjectStore
from proxy.registry.s3client import StorageUnavailable

HEALTH_INTERVAL = 10.0
PEER_PATH = "/_pullgate/peer/blobs/"  # + digest; served by proxy.http.peerapi
_PEER_SECRET = "peer-secret"


class Cluster:
    """Built from the config (nothing is opened); ``open`` connects what is configured,
    ``close`` (idempotent) disconnects. With neither part configured it is inert:
    ``objects`` and ``coordinator`` stay None and both gauges read 1."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self.objects: ObjectStore | None = None
        self.coordinator: Coordinator | None = None
        self.advertise_url = config.coordination.advertise_url
        self.redirect = config.storage.type == "s3" and config.storage.redirect  # blob GETs answer 307
        self._peer_secret: str | None = None
        self._stack = contextlib.AsyncExitStack()
        self._storage_up: bool | None = None
        self._log = structlog.get_logger("pullgate.cluster")
        metrics.coordination_up.set(1)
        metrics.object_store_up.set(1)

    @property
    def storage_up(self) -> bool:
        """False from a failed object-store call until one succeeds again (``check`` runs
        every ``HEALTH_INTERVAL``): callers skip the store meanwhile instead of each
        waiting for its timeout."""
        return self._storage_up is not False

    @property
    def shared(self) -> bool:
        return self.objects is not None

    async def open(self) -> None:
        """Open the configured clients. Neither needs to answer now: a replica starts (and
        serves alone) while Redis or the object store is down."""
        try:
            if self._config.storage.type == "s3":
                self.objects = await self._stack.enter_async_context(ObjectStore.open(self._config.storage))
            if self._config.coordination.type == "redis":
                self.coordinator = await self._stack.enter_async_context(
                    Coordinator.open(self._config.coordination, on_health=self._coordination_health)
                )
        except BaseException:
            await self.close()
            raise
        await self.check()

    async def close(self) -> None:
        await self._stack.aclose()

    # --- health ---------------------------------------------------------------------------
    def _coordination_health(self, up: bool) -> None:
        self._metrics.coordination_up.set(1 if up else 0)

    def storage_health(self, up: bool, error: BaseException | None = None) -> None:
        """What the last object-store call saw (callers report failures they degraded from)."""
        self._metrics.object_store_up.set(1 if up else 0)
        if up == self._storage_up:
            return
        self._storage_up = up
        if up:
            self._log.info("object_store_up")
        else:
            self._log.warning("object_store_down", error=getattr(error, "message", repr(error)))

    async def check(self) -> None:
        """Ask each configured part once (updates the gauges; never raises)."""
        if self.coordinator is not None:
            await self.coordinator.ping()
        if self.objects is not None:
            try:
                await self.objects.check()
            except StorageUnavailable as exc:
                self.storage_health(False, exc)
            else:
                self.storage_health(True)

    async def watch(self) -> None:
        """The background check (run by the mirror's supervisor)."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            await self.check()

    async def storage_call(self, request: Callable[[], Awaitable[object]]) -> bool:
        """Run one object-store request, reporting its health; False when it failed."""
        try:
            await request()
        except StorageUnavailable as exc:
            self.storage_health(False, exc)
            return False
        self.storage_health(True)
        return True

    # --- peers ----------------------------------------------------------------------------
    async def peer_secret(self) -> str | None:
        """The bearer token replicas present to each other's peer endpoint: one random value
        per cluster, created by whichever replica asks first and kept in Redis (whoever can
        read Redis is inside the cluster's trust already). None while Redis is down."""
        if self._peer_secret is None and self.coordinator is not None:
            with contextlib.suppress(CoordinationUnavailable):
                self._peer_secret = await self.coordinator.shared_secret(_PEER_SECRET)
        return self._peer_secret

    async def peer_tls(self) -> aiohttp.Fingerprint | bool:
        """How a peer's https certificate is checked: every replica serves the same
        certificate (the chart mounts one Secret in all pods), so a peer must present exactly
        ours — pinned by its SHA-256 — whatever address it is reached at (a pod IP is rarely
        in a certificate). Read on each call: the listener reloads a rotated certificate.
        True (normal verification) when this replica serves plain HTTP."""
        cert = self._config.tls_cert
        if cert is None:
            return True
        try:
            pem = await asyncio.to_thread(cert.read_text)
            start = pem.index("-----BEGIN CERTIFICATE-----")
            end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
            der = ssl.PEM_cert_to_DER_cert(pem[start:end])
        except (OSError, ValueError) as exc:  # mid-rotation: the peer is checked as any https server
            self._log.warning("peer_certificate_unreadable", path=str(cert), error=exc.__class__.__name__)
            return True
        return aiohttp.Fingerprint(hashlib.sha256(der).digest())

    def peer_url(self, base: str, digest: str) -> str:
        return base.rstrip("/") + PEER_PATH + digest
