"""Several pullgate replicas in this process, sharing one Redis and one S3 bucket, each on
its own loopback port with its own cache directory (its local tier), as a Deployment of N
pods would run them. Each replica advertises its own URL for the peer endpoint."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.config.storage import CoordinationConfig, StorageConfig
from proxy.http.app import create_app
from proxy.http.appkeys import MIRROR
from proxy.registry.mirror import Mirror
from tests.support.procs import free_port
from tests.support.s3engine import S3Engine

BUCKET = "pullgate-test"  # created by the s3_engine fixtures (tests/conftest.py S3_BUCKET)
ACCESS_ENV, SECRET_ENV = "TEST_REPLICA_S3_ACCESS", "TEST_REPLICA_S3_SECRET"


@dataclass
class Replica:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def mirror(self) -> Mirror:
        return self.app[MIRROR]

    async def stop(self) -> None:
        await self.runner.cleanup()


def cluster_config(
    tmp_path: Path, upstream_url: str, *, engine: S3Engine | None, redis_url: str | None, prefix: str,
    s3_endpoint: str | None = None,
) -> Config:
    """A replica's config without its cache dir and advertise URL (``start_replicas`` sets them)."""
    storage = StorageConfig()
    if engine is not None:
        storage = StorageConfig(
            type="s3", endpoint=s3_endpoint or engine.endpoint, bucket=BUCKET, prefix=prefix,
            access_key_env=ACCESS_ENV, secret_key_env=SECRET_ENV, part_size=5 << 20, timeout=5.0,
        )  # fmt: skip
    coordination = CoordinationConfig()
    if redis_url is not None:
        coordination = CoordinationConfig(
            type="redis", url=redis_url, key_prefix=f"pg-{prefix.strip('/')}:", timeout=2.0, lease_ttl=6.0
        )
    return Config(
        cache=CacheConfig(dir=tmp_path),
        upstreams=(UpstreamConfig("docker.io", upstream_url),),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=5, read=30, manifest=10, retries=1, backoff=0.05),
        storage=storage,
        coordination=coordination,
    )


@contextlib.asynccontextmanager
async def start_replicas(
    tmp_path: Path, base: Config, count: int, monkeypatch: pytest.MonkeyPatch, engine: S3Engine | None,
    *, tls: tuple[Path, Path] | None = None,
) -> AsyncIterator[list[Replica]]:
    """``tls``: (certificate, key) every replica serves, as the chart mounts one Secret in all pods."""
    if engine is not None:
        monkeypatch.setenv(ACCESS_ENV, engine.keys.access_key)
        monkeypatch.setenv(SECRET_ENV, engine.keys.secret_key)
    replicas: list[Replica] = []
    try:
        for index in range(count):
            port = free_port()
            url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
            context = None
            if tls is not None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(*tls)
            coordination = base.coordination
            if coordination.type == "redis":
                coordination = replace(coordination, advertise_url=url)
            config = replace(
                base, cache=replace(base.cache, dir=tmp_path / f"replica-{index}"), coordination=coordination,
                tls_cert=tls[0] if tls else None, tls_key=tls[1] if tls else None,
            )  # fmt: skip
            app = create_app(config)
            # A short shutdown cuts running transfers when a replica stops, as a killed pod would.
            runner = web.AppRunner(app, shutdown_timeout=0.2)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
            replicas.append(Replica(url, app, runner))
        yield replicas
    finally:
        for replica in replicas:
            await replica.stop()
