"""Several pullgate daemons (real processes, ``tests/support/daemon.py``) as one cluster:
one S3 bucket, one Redis, each replica on its own loopback port with its own cache
directory (its local tier) and advertising its own URL for the peer endpoint — a
Deployment of N pods on one machine. The S3 keys reach the daemons through their
environment (``access_key_env`` / ``secret_key_env``), never through the config file.

In-process replicas for unit-sized tests: ``tests/support/replicas.py``.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon
from tests.support.procs import free_port
from tests.support.s3engine import S3Engine

BUCKET = "pullgate-test"  # created by the engine fixtures (tests/conftest.py S3_BUCKET)
ACCESS_ENV, SECRET_ENV = "PULLGATE_FLEET_S3_ACCESS", "PULLGATE_FLEET_S3_SECRET"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def shared_settings(
    engine: S3Engine, redis_url: str | None, prefix: str, *, lease_ttl: str = "6s", bucket: str = BUCKET
) -> dict[str, Any]:
    """``storage`` and ``coordination`` of every replica (``advertise_url`` is added per replica)."""
    settings: dict[str, Any] = {
        "storage": {
            "type": "s3", "endpoint": engine.endpoint, "bucket": bucket, "prefix": prefix,
            "access_key_env": ACCESS_ENV, "secret_key_env": SECRET_ENV, "part_size": "5MiB", "timeout": "5s",
        },
    }  # fmt: skip
    if redis_url is not None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix).strip("-") or "pg"
        settings["coordination"] = {
            "type": "redis", "url": redis_url, "key_prefix": f"{slug}:", "timeout": "1s", "lease_ttl": lease_ttl,
        }  # fmt: skip
    return settings


class Fleet:
    """``count`` replicas of ``python -m proxy serve`` sharing ``engine`` (and Redis, if given)."""

    def __init__(
        self, workdir: Path, upstream: str, count: int, *, engine: S3Engine, redis_url: str | None, prefix: str,
        lease_ttl: str = "6s", **settings: Any,
    ) -> None:
        shared = shared_settings(engine, redis_url, prefix, lease_ttl=lease_ttl)
        self.key_prefix: str | None = shared.get("coordination", {}).get("key_prefix")
        env = {ACCESS_ENV: engine.keys.access_key, SECRET_ENV: engine.keys.secret_key}
        self.daemons: list[Daemon] = []
        for index in range(count):
            port = free_port()
            mine = {key: dict(value) for key, value in shared.items()}
            if "coordination" in mine:
                mine["coordination"]["advertise_url"] = f"http://127.0.0.1:{port}"
            self.daemons.append(
                Daemon(workdir / f"replica-{index}", upstream, port=port, env=env, **mine, **settings)
            )

    @property
    def urls(self) -> list[str]:
        return [d.url("") for d in self.daemons]

    def by_url(self, url: str) -> Daemon:
        (found,) = [d for d in self.daemons if d.url("") == url.rstrip("/")]
        return found

    def start(self) -> Fleet:
        """Start every replica at once, then wait for each to be ready (imports overlap)."""
        try:
            for daemon in self.daemons:
                daemon.start(wait=False)
            for daemon in self.daemons:
                daemon.wait_ready(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[Daemon]:
        return iter(self.daemons)


def gauge(base_url: str, name: str) -> float | None:
    """One unlabelled sample from a replica's ``/metrics`` (None if absent or unreachable)."""
    try:
        with _OPENER.open(f"{base_url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
