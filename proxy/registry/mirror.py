"""The mirror: the cache (store + catalog), the upstream clients and the services built on
them, opened and closed as one unit. It is what the HTTP routes, the admission webhook
(tag resolution) and the CLI tools talk to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from urllib.parse import quote, urlencode

import aiohttp
import structlog
from prometheus_client import CollectorRegistry

from proxy.config.settings import Config
from proxy.errors import CatalogUnavailable, ConfigError, UpstreamError
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import OCI_INDEX
from proxy.oci.reference import ImageReference
from proxy.ops.limits import FetchLimiter
from proxy.ops.looplag import watch_loop_lag
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import Supervisor
from proxy.registry.blobs import BlobService
from proxy.registry.catalog import Catalog, LocalCatalog
from proxy.registry.cluster import Cluster
from proxy.registry.clustercatalog import ClusterCatalog
from proxy.registry.clustereviction import ClusterEviction
from proxy.registry.clusterindex import ClusterIndex
from proxy.registry.content import MirrorContent
from proxy.registry.eviction import digests, plan_eviction
from proxy.registry.manifests import Manifest, ManifestCache, Resolution
from proxy.registry.provenance import Provenance
from proxy.registry.routing import Route, Router
from proxy.registry.store import BlobStore
from proxy.registry.upstream.client import RegistryClient, UpstreamResponse

_FLUSH_INTERVAL = 5.0
_EVICT = "cache_evict"  # one eviction at a time
_CLUSTER_EVICT = "cluster_evict"
_MAX_LIST_BODY = 4 << 20


class Mirror:
    """Built whole here; ``open()`` does the disk work; ``close()`` (idempotent) closes
    everything in reverse order, whatever failed before."""

    def __init__(self, config: Config, metrics: Metrics | None = None, *, limiter: FetchLimiter | None = None) -> None:
        """``limiter``: the daemon's bound on upstream fetches for its clients (the CLI
        tools' own Mirrors have none). Needs a running event loop (the HTTP session)."""
        self.config = config
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.router = Router(config)
        root = config.cache.dir
        self.store = BlobStore(root)
        self.catalog: Catalog = LocalCatalog(root / "catalog.db")
        self.cluster = Cluster(config, self.metrics)  # the object store and Redis, when configured
        self.cluster_eviction: ClusterEviction | None = None  # with Redis, once opened
        if config.coordination.type == "redis":
            # The cluster's image graph and pull times follow the local catalog's writes.
            self.catalog = ClusterCatalog(self.catalog, self._cluster_index, clock=time.time)
        self.provenance = Provenance(self.catalog, cluster=self.cluster)
        self._log = structlog.get_logger("pullgate.mirror")
        self._tasks = Supervisor(self.metrics, self._log)
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": "pullgate"}, auto_decompress=False
        )
        self.upstreams: dict[str, RegistryClient] = {}
        for upstream in config.upstreams:
            self.metrics.declare_upstream(upstream.name)
            self.upstreams[upstream.name] = RegistryClient(
                upstream, self._session, config.timeouts, self.metrics, limiter=limiter
            )
        self.manifests = ManifestCache(
            self.store, self.catalog, self.provenance, self.upstreams, config.cache, self.metrics,
            on_stored=self._check_quota, tasks=self._tasks, cluster=self.cluster,
        )  # fmt: skip
        self.blobs = BlobService(
            self.store, self.catalog, self.provenance, self.upstreams, self.metrics,
            cluster=self.cluster, session=self._session, on_stored=self._check_quota, on_full=self._disk_full,
        )  # fmt: skip
        self._opened = False
        # Closed last to first: downloads may finish (and start an eviction) within the
        # grace, then the background tasks stop, then the session and the catalog close.
        self._closing = contextlib.AsyncExitStack()
        self._closing.push_async_callback(self.catalog.close)
        self._closing.push_async_callback(self._session.close)
        self._closing.push_async_callback(self.cluster.close)
        if isinstance(self.catalog, ClusterCatalog):
            self._closing.push_async_callback(self.catalog.push)  # while Redis is still open
        self._closing.push_async_callback(self._tasks.close)
        self._closing.push_async_callback(self.blobs.close, config.shutdown_grace)

    # --- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Open the cache; ``ConfigError`` naming ``cache.dir`` when it cannot be written.
        A failed open has closed everything again (the session the constructor made too)."""
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        root = self.config.cache.dir
        try:
            await self.store.open()
            await asyncio.to_thread(self._probe_store)
        except OSError as exc:
            reason = (exc.strerror or exc.__class__.__name__).lower()
            raise ConfigError(f"cache.dir: {root} is not writable ({reason})") from exc
        await self.catalog.open()
        await self.cluster.open()
        dropped = await self.catalog.reconcile(await self.store.scan())
        await self._update_size_metrics()
        self.metrics.cache_max_bytes.set(self.config.cache.max_size)
        self._tasks.start("cache_flush", self._flush_loop)
        self._tasks.start("loop_lag", lambda: watch_loop_lag(self.metrics.loop_lag))
        if self.cluster.shared:
            self._tasks.start("cluster_health", self.cluster.watch)
        if self.cluster.objects is not None and self.cluster.coordinator is not None:
            self.cluster_eviction = ClusterEviction(
                self.cluster.objects, self.cluster.coordinator, self.metrics,
                max_size=self.config.storage.max_size, low_water=self.config.cache.low_water,
                flush=self.catalog.flush, on_storage=self.cluster.storage_health,
            )  # fmt: skip
            self._tasks.start(_CLUSTER_EVICT, self.cluster_eviction.run)
        self._opened = True
        self._log.info("cache_opened", dir=str(root), reconciled=dropped)

    def _probe_store(self) -> None:
        """Prove a file can be written in the cache (an existing cache on a read-only mount
        opens without error until the first write)."""
        probe = self.store.tmp / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()

    async def close(self) -> None:
        await self._closing.aclose()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL)
            await self.catalog.flush()
            await self._update_size_metrics()

    def _cluster_index(self) -> ClusterIndex | None:
        return self.cluster_eviction.index if self.cluster_eviction is not None else None

    # --- quota ---------------------------------------------------------------------------
    def _check_quota(self) -> None:
        if self.cluster_eviction is not None:
            self.cluster_eviction.poke()  # the bucket may be over its quota: the task checks
        if self.catalog.total_bytes > self.config.cache.max_size and not self._tasks.active(_EVICT):
            self._tasks.start(_EVICT, self.evict)

    def _disk_full(self) -> None:
        """The disk filled before the quota did: shrink to the low-water mark of what the
        store holds now."""
        if not self._tasks.active(_EVICT):
            target = int(min(self.catalog.total_bytes, self.config.cache.max_size) * self.config.cache.low_water)
            self._tasks.start(_EVICT, lambda: self.evict(target))

    async def evict(self, target: int | None = None) -> int:
        """Evict least recently pulled images until the store holds at most ``target``
        bytes (default: the low-water mark). Returns the bytes freed."""
        if target is None:
            target = int(self.config.cache.max_size * self.config.cache.low_water)
        busy = frozenset(str(d) for d in self.blobs.in_flight())
        try:
            snapshot = await self.catalog.snapshot()
        except CatalogUnavailable as exc:
            self._log.warning("eviction_postponed", error=exc.message)
            return 0
        freed = 0
        for victim in plan_eviction(snapshot, target, busy):
            removed = digests(victim)
            names = await self.catalog.image_names(Digest.parse(victim.root))  # before it forgets them
            await self.catalog.forget(removed)  # rows first: none may point at deleted bytes
            for digest in removed:
                freed += await self.store.remove(digest)
                self.manifests.forget(digest)
            self.metrics.evictions.inc()
            self.metrics.evicted_bytes.inc(victim.size)
            self._log.info(
                "cache_evicted",
                images=names,
                root=victim.root,
                objects=len(victim.members),
                bytes=victim.size,
                last_used=round(victim.last_used),
            )
        await self._update_size_metrics()
        return freed

    async def _update_size_metrics(self) -> None:
        try:
            size, count = await self.catalog.totals()  # also counts what ``import`` added
        except CatalogUnavailable as exc:
            self._log.warning("cache_size_unknown", error=exc.message)
            return
        self.metrics.cache_bytes.set(size)
        self.metrics.cache_objects.set(count)

    async def ready(self) -> bool:
        """Opened, and a file can be written in the cache now (the probe runs in a thread)."""
        return self._opened and await asyncio.to_thread(self.store.writable)

    # --- the registry API --------------------------------------------------------------
    async def manifest(self, route: Route, reference: str) -> Manifest:
        return await self.manifests.get(route, reference)

    def record_pull(self, route: Route, digest: Digest) -> None:
        """A client GET a manifest: that is a pull (HEADs and the mirror's own reads are not)."""
        self.manifests.pulled(route, digest)

    async def tags_list(self, route: Route, query: dict[str, str]) -> UpstreamResponse:
        path = "tags/list"
        if query:
            path += "?" + urlencode(query)
        return await self._passthrough(route, path)

    async def referrers_index(
        self, route: Route, digest: Digest, artifact_type: str | None
    ) -> tuple[bytes, bool, bool]:
        """The referrers index (OCI 1.1), whether it was filtered by artifact type, and
        whether the upstream supports the API at all.

        Registries without the referrers API (Distribution 2.8) answer 404: the spec's
        fallback for clients is an empty index, which is what we return.
        """
        query = f"?artifactType={quote(artifact_type, safe='')}" if artifact_type else ""
        response = await self._passthrough(route, f"referrers/{digest}{query}")
        if response.status in (404, 405, 400):
            return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(), False, False
        if response.status != 200:
            raise UpstreamError(f"upstream answered {response.status} for referrers")
        filtered = "artifactType" in response.headers.get("OCI-Filters-Applied", "")
        body = response.body
        if artifact_type and not filtered:
            body, filtered = _filter_referrers(body, artifact_type), True
        return body, filtered, True

    async def _passthrough(self, route: Route, path: str) -> UpstreamResponse:
        client = self.upstreams[route.upstream]
        return await client.fetch("GET", route.repository, path, max_size=_MAX_LIST_BODY)

    # --- TagResolver for the admission webhook ----------------------------------------------
    async def resolve(self, ref: ImageReference) -> Resolution:
        """Tag -> digest through the cache (a memory lookup while the tag is fresh)."""
        route = self.route_image(ref)
        if ref.digest is not None:
            return Resolution(ref.digest, "cache")
        assert ref.tag is not None
        manifest = await self.manifests.get(route, ref.tag)
        return Resolution(manifest.digest, "cache" if manifest.result in ("hit", "stale") else "upstream")

    def content(self, ref: ImageReference) -> MirrorContent:
        """Manifests, blobs and referrers of ``ref``'s upstream, through the cache."""
        return self.content_of(self.route_image(ref).upstream)

    async def parents(self, ref: ImageReference, digest: Digest) -> list[Digest]:
        """Cached indexes of ``ref``'s repository that list ``digest`` (a signature on a
        multi-arch index covers its platform manifests)."""
        route = self.route_image(ref)
        return await self.catalog.parents(route.upstream, route.repository, digest)

    def content_of(self, upstream: str) -> MirrorContent:
        """Manifests, blobs and referrers of one upstream, through the cache."""
        return MirrorContent(self.manifests, self.blobs, self.store, self.referrers_index, upstream)

    def route_image(self, ref: ImageReference) -> Route:
        return self.router.route_image(ref)


def _filter_referrers(body: bytes, artifact_type: str) -> bytes:
    index = jsondoc.parse_object(body, "upstream referrers answer", error=UpstreamError)
    try:
        index["manifests"] = [m for m in index.get("manifests", []) if m.get("artifactType") == artifact_type]
    except (AttributeError, TypeError) as exc:
        raise UpstreamError("upstream referrers answer is not an index") from exc
    return json.dumps(index).encode()
