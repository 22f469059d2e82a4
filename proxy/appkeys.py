"""Typed keys for the objects shared on the aiohttp application (no module-level state)."""

from __future__ import annotations

from aiohttp import web

from proxy.config import Config
from proxy.metrics import Metrics
from proxy.mirror import Mirror
from proxy.policyset import PolicyStore
from proxy.pullpolicy import PullPolicy

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
MIRROR = web.AppKey("mirror", Mirror)
POLICIES = web.AppKey("policies", PolicyStore)
PULL_POLICY = web.AppKey("pull_policy", PullPolicy)
