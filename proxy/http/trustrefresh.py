"""The periodic refresh of the default Sigstore trusted root through TUF (``trust.tuf``):
at startup the root a previous refresh cached (checked offline against the TUF anchor),
then every ``interval`` a fetch (``proxy.trust.tufroot``, in a thread: the ``tuf`` library
is synchronous). A new root goes into the app's ``RootHolder``, which every keyless rule
without its own ``trustedRoot`` reads at verification time. A failure keeps the last good
root (shipped or cached): an unreachable repository never takes keyless verification down.

Log events: ``trusted_root_refreshed``, ``trusted_root_refresh_failed``,
``trusted_root_cache_loaded``, ``trusted_root_cache_invalid``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from structlog.typing import FilteringBoundLogger

from proxy.config.settings import Config
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import Supervisor
from proxy.trust.trustroot import RootHolder
from proxy.trust.tufroot import TrustRootRefreshFailed, TufRootClient, load_anchor

# Bounds one whole refresh (root rotations, timestamp, snapshot, targets, the file: each
# read already bounded by the timeout) so a trickling repository cannot hold the task.
_READS_PER_REFRESH = 8


class TrustRootRefresher:
    def __init__(
        self, client: TufRootClient, roots: RootHolder, metrics: Metrics, log: FilteringBoundLogger, interval: float
    ) -> None:
        self.client = client
        self.roots = roots
        self.metrics = metrics
        self.log = log
        self.interval = interval
        metrics.trusted_root_refreshes.labels("ok")
        metrics.trusted_root_refreshes.labels("failed")

    async def load_cached(self) -> bool:
        """Install the root a previous refresh left on disk, if it still verifies."""
        try:
            root = await asyncio.to_thread(self.client.cached)
        except TrustRootRefreshFailed as exc:
            self.log.warning("trusted_root_cache_invalid", error=exc.message, keeping=self.roots.current.name)
            return False
        if root is None:
            return False
        self.roots.replace(root)
        self.log.info("trusted_root_cache_loaded", name=root.name, cache_dir=str(self.client.cache_dir))
        return True

    async def refresh(self) -> bool:
        """One fetch; True when a root was installed (a new one, or the same one confirmed)."""
        try:
            async with asyncio.timeout(self.client.timeout * _READS_PER_REFRESH):
                root = await asyncio.to_thread(self.client.fetch)
        except TrustRootRefreshFailed as exc:
            return self._failed(exc.message)
        except TimeoutError:
            return self._failed(f"{self.client.url}: no answer within {self.client.timeout * _READS_PER_REFRESH:g}s")
        self.roots.replace(root)
        self.metrics.trusted_root_refreshes.labels("ok").inc()
        self.metrics.trusted_root_refreshed.set_to_current_time()
        self.log.info("trusted_root_refreshed", url=self.client.url, name=root.name)
        return True

    def _failed(self, error: str) -> bool:
        self.metrics.trusted_root_refreshes.labels("failed").inc()
        keeping = self.roots.current.name
        self.log.warning("trusted_root_refresh_failed", url=self.client.url, error=error, keeping=keeping)
        return False

    @asynccontextmanager
    async def running(self, metrics: Metrics) -> AsyncIterator[TrustRootRefresher]:
        """For as long as the context lasts: the cached root at once, then a supervised
        task refreshing every ``interval``."""
        await self.load_cached()
        async with Supervisor(metrics, self.log) as tasks:
            tasks.start("trusted_root_refresh", self.run)
            yield self

    async def run(self) -> None:
        """Refresh now, then every ``interval``, forever (a supervised task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)


def refresher(config: Config, roots: RootHolder, metrics: Metrics, log: FilteringBoundLogger) -> TrustRootRefresher:
    """The refresher ``trust.tuf`` describes (its ``url`` must be set); a bad anchor file
    is a ``ConfigError`` naming ``trust.tuf.root``."""
    tuf = config.trust.tuf
    assert tuf.url is not None
    client = TufRootClient(tuf.url, load_anchor(tuf.root), config.tuf_cache_dir(), tuf.timeout)
    return TrustRootRefresher(client, roots, metrics, log, tuf.interval)
