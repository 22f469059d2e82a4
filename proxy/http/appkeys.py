"""Typed keys for the objects shared on the aiohttp application (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.access.control import Access
from proxy.config.settings import Config
from proxy.http.sendfile import FileSender
from proxy.http.trustrefresh import TrustRootRefresher
from proxy.ops.limits import FetchLimiter
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicyStore
from proxy.policy.pulltime import PullPolicy
from proxy.registry.mirror import Mirror
from proxy.trust.trustroot import RootHolder


@dataclass
class Lifecycle:
    """Process state the handlers read: ``/readyz`` answers 503 once draining starts."""

    draining: bool = False
    config_path: Path | None = None


ACCESS = web.AppKey("access", Access)  # only when access.enabled
CONFIG = web.AppKey("config", Config)
FETCH_LIMITER = web.AppKey("fetch_limiter", FetchLimiter)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Metrics)
MIRROR = web.AppKey("mirror", Mirror)
POLICIES = web.AppKey("policies", PolicyStore)
PULL_POLICY = web.AppKey("pull_policy", PullPolicy)
SENDER = web.AppKey("sender", FileSender)  # blob bytes to clients by sendfile, off the event loop
TRUST_ROOTS = web.AppKey("trust_roots", RootHolder)  # the default Sigstore root (shipped, or refreshed: trust.tuf)
TRUST_REFRESH = web.AppKey("trust_refresh", TrustRootRefresher)  # only when trust.tuf.url is set
