"""The cache's parts wired by hand, as ``Mirror.open`` wires them, around one upstream (the
``Origin`` fault-knob app, or a real registry) — for tests of one part at a time (blobs,
manifests, the catalog) with an injected clock instead of sleeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.config.settings import CacheConfig, TimeoutConfig, UpstreamConfig
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import Supervisor
from proxy.registry.blobs import BlobService
from proxy.registry.catalog import LocalCatalog
from proxy.registry.manifests import ManifestCache
from proxy.registry.provenance import Provenance
from proxy.registry.routing import Route
from proxy.registry.store import BlobStore
from proxy.registry.upstream.client import RegistryClient

UPSTREAM = "docker.io"


class Clock:
    """Wall-clock time that moves only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Parts:
    root: Path
    clock: Clock
    metrics: Metrics
    store: BlobStore
    catalog: LocalCatalog
    provenance: Provenance
    blobs: BlobService
    manifests: ManifestCache

    @staticmethod
    def route(repository: str) -> Route:
        return Route(UPSTREAM, repository)


@asynccontextmanager
async def cache_parts(
    root: Path,
    upstream_url: str,
    *,
    cache: CacheConfig | None = None,
    proof_ttl: float = 3600.0,
    lock_wait: float = 1.0,
) -> AsyncIterator[Parts]:
    clock, metrics = Clock(), Metrics(CollectorRegistry())
    config = cache or CacheConfig(dir=root)
    store = BlobStore(root)
    catalog = LocalCatalog(root / "catalog.db", clock=clock, lock_wait=lock_wait, sync_interval=0.0)
    provenance = Provenance(catalog, ttl=proof_ttl, clock=clock)
    timeouts = TimeoutConfig(connect=2, read=10, manifest=5, retries=0, backoff=0.01)
    async with aiohttp.ClientSession(auto_decompress=False) as session, Supervisor(metrics) as tasks:
        upstreams = {UPSTREAM: RegistryClient(UpstreamConfig(UPSTREAM, upstream_url), session, timeouts, metrics)}
        await store.open()
        await catalog.open()
        manifests = ManifestCache(store, catalog, provenance, upstreams, config, metrics, tasks=tasks, clock=clock)
        blobs = BlobService(store, catalog, provenance, upstreams, metrics)
        try:
            yield Parts(root, clock, metrics, store, catalog, provenance, blobs, manifests)
        finally:
            await blobs.close(1.0)
            await catalog.close()
