"""Provenance: may a stored digest be served under a repository's name?

The store is shared by every upstream and repository, but the distribution spec scopes
blobs and manifests to repositories — and access rules are per repository. So a cached
object is served for ``(upstream, repository)`` only when that upstream has shown that the
repository holds it (a *proof* in the catalog): it was fetched from that exact
``(upstream, repository)``, or the upstream answered a HEAD for it there, or an operator
imported it there. A manifest of the repository that merely *references* a digest proves
nothing: anyone who can push to a public repository can write such a manifest (issue 13:
layers with ``urls`` naming another repository's private digests).

A proof is trusted for ``ttl`` and then asked again (a HEAD, which Docker Hub does not
count as a pull). A 404 means not served — and the proof is dropped; while the upstream
cannot be reached an expired proof still serves (as ``max_stale`` does for tags).

Several replicas share proofs through Redis (``proxy.registry.sharedstate``): each proof
this replica records is also written there, under a key naming the exact (upstream,
repository, digest), for what is left of its ``ttl``; a replica without a fresh proof of its
own asks Redis before the upstream and keeps what it finds. A 404 removes it there too.
Whoever can write Redis can therefore vouch for a repository — it is inside the cluster's
trust, like the object store's keys. ``proven`` (the in-memory hot path) asks only the local
catalog: when it says no, the slow path calls ``establish``, which asks Redis.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from proxy.errors import BlobUnknown, ManifestUnknown, UpstreamRateLimited, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.registry.catalog import Catalog
from proxy.registry.cluster import Cluster
from proxy.registry.routing import Route
from proxy.registry.sharedstate import SharedState

PROOF_TTL = 24 * 3600.0

# Asks the upstream whether the route's repository holds the digest: returns on yes, raises
# BlobUnknown/ManifestUnknown on no, an UpstreamError when it cannot tell.
Ask = Callable[[], Awaitable[object]]


class Provenance:
    def __init__(
        self,
        catalog: Catalog,
        *,
        ttl: float = PROOF_TTL,
        clock: Callable[[], float] = time.time,
        cluster: Cluster | None = None,
    ) -> None:
        """``cluster``: share proofs with the other replicas through its Redis, when it has one."""
        self._catalog = catalog
        self._ttl = ttl
        self._clock = clock
        self._shared = SharedState(cluster)
        self._log = structlog.get_logger("pullgate.provenance")

    async def proven(self, route: Route, digest: Digest) -> bool:
        """A fresh proof exists locally (a memory lookup once memoized)."""
        return await self.proven_until(route, digest) is not None

    async def proven_until(self, route: Route, digest: Digest) -> float | None:
        """When the fresh local proof that ``route`` holds ``digest`` expires (on the clock);
        None without a fresh proof here."""
        checked = await self._catalog.proof(route.upstream, route.repository, digest)
        if checked is None or self._clock() - checked >= self._ttl:
            return None
        return checked + self._ttl

    async def establish(self, route: Route, digest: Digest, ask: Ask) -> None:
        """Return if ``route`` may be served ``digest``, asking the other replicas (Redis)
        and then the upstream when no fresh proof exists here; raise the upstream's
        ``BlobUnknown``/``ManifestUnknown`` otherwise."""
        checked = await self._catalog.proof(route.upstream, route.repository, digest)
        now = self._clock()
        if checked is not None and now - checked < self._ttl:
            return
        shared = await self._shared.proof(route.upstream, route.repository, digest)
        if shared is not None:
            shared = min(shared, now)  # another replica's clock ahead of ours earns no extra life
            if now - shared < self._ttl:
                await self._catalog.prove(route.upstream, route.repository, digest, shared)
                return
        try:
            await ask()
        except (BlobUnknown, ManifestUnknown):
            if checked is not None:
                await self._catalog.disprove(route.upstream, route.repository, digest)
            await self._shared.disprove(route.upstream, route.repository, digest)
            raise
        except (UpstreamUnavailable, UpstreamRateLimited) as exc:
            known = max((t for t in (checked, shared) if t is not None), default=None)
            if known is None:
                raise
            self._log.warning(
                "stale_proof_used",
                upstream=route.upstream,
                repository=route.repository,
                digest=str(digest),
                age=round(now - known),
                error=exc.message,
            )
            return
        await self._catalog.prove(route.upstream, route.repository, digest, now)
        await self.announce(route, digest, now)

    async def record(self, route: Route, digest: Digest) -> None:
        """``digest`` was just fetched from ``route``: that is a proof."""
        now = self._clock()
        await self._catalog.prove(route.upstream, route.repository, digest, now)
        await self.announce(route, digest, now)

    async def announce(self, route: Route, digest: Digest, checked: float) -> None:
        """Tell the other replicas of a proof already in the local catalog (kept in Redis
        for what is left of its ``ttl``)."""
        remaining = self._ttl - (self._clock() - checked)
        await self._shared.prove(route.upstream, route.repository, digest, checked=checked, ttl=remaining)
