"""Supervised background tasks (``proxy.ops.supervisor``): failures are logged with their
traceback, counted by task and restarted with backoff (injected clock and sleep: no real
waiting), and ``close()`` ends everything. Then the mirror's own tasks: a failing eviction
is restarted and ``Mirror.close()`` still closes the session and the catalog."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.config.settings import CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.errors import CatalogUnavailable, ConfigError
from proxy.oci.digest import Digest
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import Backoff, Supervisor
from proxy.registry.mirror import Mirror
from proxy.registry.routing import Route
from tests.support.images import sha256_digest
from tests.support.origin import Origin
from tests.support.polling import eventually


class FakeTime:
    """The supervisor's clock and sleep: sleeping advances the clock at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Flaky:
    """A job that fails ``failures`` times (each run taking ``runtime`` fake seconds), then
    either returns or, with ``forever``, waits until cancelled."""

    def __init__(self, time: FakeTime, failures: int, *, runtime: float = 0.0, forever: bool = False) -> None:
        self.time, self.failures, self.runtime, self.forever = time, failures, runtime, forever
        self.runs = 0
        self.cancelled = False
        self.settled = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        self.time.now += self.runtime
        if self.runs <= self.failures:
            raise RuntimeError(f"failure {self.runs}")
        self.settled.set()
        if self.forever:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise


def failures(metrics: Metrics, task: str) -> float:
    return metrics.registry.get_sample_value("pullgate_background_task_failures_total", {"task": task}) or 0.0


@pytest.mark.parametrize(
    ("fail", "runtime", "restart", "runs", "sleeps", "streak"),
    [
        (0, 0.0, True, 1, [], []),  # no failure: nothing logged, nothing counted
        (3, 0.0, True, 4, [1.0, 2.0, 4.0], [1, 2, 3]),  # restarted with a doubling backoff
        (8, 0.0, True, 9, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0], [1, 2, 3, 4, 5, 6, 7, 8]),  # ... capped
        (3, 100.0, True, 4, [1.0, 1.0, 1.0], [1, 1, 1]),  # each run was healthy for long: backoff starts over
        (1, 0.0, False, 1, [], [1]),  # a one-shot job: logged and counted, not restarted
    ],
)
async def test_failures_are_logged_counted_and_restarted(
    fail: int, runtime: float, restart: bool, runs: int, sleeps: list[float], streak: list[int]
) -> None:
    time, metrics = FakeTime(), Metrics(CollectorRegistry())
    job = Flaky(time, fail, runtime=runtime)
    tasks = Supervisor(metrics, backoff=Backoff(1.0, 60.0), sleep=time.sleep, clock=time.clock)
    with structlog.testing.capture_logs() as logs:
        tasks.start("flaky", job, restart=restart)
        await eventually(lambda: not tasks.active("flaky"))
    await tasks.close()
    assert job.runs == runs
    assert time.sleeps == sleeps
    assert failures(metrics, "flaky") == fail
    assert [(e["event"], e["task"], e["failures"]) for e in logs] == [
        ("background_task_failed", "flaky", n) for n in streak
    ]
    for n, event in enumerate(logs, start=1):
        assert isinstance(event["exc_info"], RuntimeError) and str(event["exc_info"]) == f"failure {n}"
        assert event["log_level"] == "error"
        assert event["restart_in"] == (sleeps[n - 1] if restart else None)


async def test_a_failing_loop_keeps_running_until_close() -> None:
    time, metrics = FakeTime(), Metrics(CollectorRegistry())
    loop = Flaky(time, 2, forever=True)
    tasks = Supervisor(metrics, sleep=time.sleep, clock=time.clock)
    tasks.start("loop", loop)
    await asyncio.wait_for(loop.settled.wait(), 5)
    assert tasks.active("loop") and loop.runs == 3
    await tasks.close()
    assert loop.cancelled and not tasks.active("loop")
    assert not tasks.start("loop", loop), "nothing starts after close"
    assert failures(metrics, "loop") == 2


def test_a_task_series_exists_before_its_first_failure() -> None:
    """Prometheus' increase() needs a sample before the first failure."""
    metrics = Metrics(CollectorRegistry())

    async def run() -> None:
        async with Supervisor(metrics) as tasks:
            tasks.start("quiet", asyncio.Event().wait)

    asyncio.run(run())
    assert metrics.registry.get_sample_value("pullgate_background_task_failures_total", {"task": "quiet"}) == 0.0


# --- the mirror's tasks ------------------------------------------------------------------------
def mirror_config(tmp_path: Path, origin: TestServer, **cache: int) -> Config:
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache", **cache),
        upstreams=(UpstreamConfig("docker.io", str(origin.make_url("")).rstrip("/")),),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=2, read=5, manifest=5, retries=0, backoff=0.01),
    )


async def test_a_failing_eviction_is_restarted_and_close_still_closes_everything(
    origin: tuple[Origin, TestServer], tmp_path: Path
) -> None:
    state, server = origin
    old = state.add_image("library/old", "1", layers=[200_000])
    new = state.add_image("library/new", "1", layers=[200_000])
    metrics = Metrics(CollectorRegistry())
    mirror = Mirror(mirror_config(tmp_path, server, max_size=300_000), metrics)
    try:
        await mirror.open()
        await mirror.manifests.get(Route("docker.io", "library/old"), "1")
        await fetch_blob(mirror, Route("docker.io", "library/old"), sha256_digest(old.layers[0]))
        # The old image's layer cannot be deleted (a directory stands where the file was):
        # eviction fails on it, again and again.
        path = mirror.store.path(Digest.parse(sha256_digest(old.layers[0])))
        path.unlink()
        (path / "stuck").mkdir(parents=True)
        with structlog.testing.capture_logs() as logs:
            await mirror.manifests.get(Route("docker.io", "library/new"), "1")
            await fetch_blob(mirror, Route("docker.io", "library/new"), sha256_digest(new.layers[0]))  # over the quota
            await eventually(lambda: failures(metrics, "cache_evict") >= 1, timeout=5)
    finally:
        await mirror.close()
    failed = [e for e in logs if e["event"] == "background_task_failed"]
    assert failed and failed[0]["task"] == "cache_evict" and isinstance(failed[0]["exc_info"], IsADirectoryError)
    assert mirror._session.closed, "the HTTP session is closed although a task failed"
    with pytest.raises(CatalogUnavailable, match="catalog is closed"):  # closed too
        await mirror.catalog.image_names(Digest.parse(sha256_digest(old.layers[0])))


async def fetch_blob(mirror: Mirror, route: Route, digest: str) -> None:
    """GET a blob through the mirror until it is committed to the store."""
    found = await mirror.blobs.get(route, Digest.parse(digest))
    if hasattr(found, "read"):
        async for _ in found.read(0, None):
            pass
    await eventually(lambda: mirror.store.size(Digest.parse(digest)) is not None)


async def test_close_without_open_closes_what_the_constructor_made(tmp_path: Path) -> None:
    mirror = Mirror(Config(cache=CacheConfig(dir=tmp_path / "never-opened")))
    await mirror.close()
    assert mirror._session.closed
    assert not (tmp_path / "never-opened").exists()


async def test_a_failed_open_closes_what_the_constructor_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    mirror = Mirror(Config(cache=CacheConfig(dir=tmp_path / "file" / "cache")))
    with pytest.raises(ConfigError, match=r"cache\.dir: .* is not writable \(not a directory\)"):
        await mirror.open()
    assert mirror._session.closed
    await mirror.close()  # and closing again is harmless
