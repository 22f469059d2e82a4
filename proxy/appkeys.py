"""Typed keys for the objects shared on the aiohttp application (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.config import Config
from proxy.metrics import Metrics
from proxy.mirror import Mirror
from proxy.policyset import PolicyStore
from proxy.pullpolicy import PullPolicy


@dataclass
class Lifecycle:
    """Process state the handlers read: ``/readyz`` answers 503 once draining starts."""

    draining: bool = False
    config_path: Path | None = None


CONFIG = web.AppKey("config", Config)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Metrics)
MIRROR = web.AppKey("mirror", Mirror)
POLICIES = web.AppKey("policies", PolicyStore)
PULL_POLICY = web.AppKey("pull_policy", PullPolicy)
