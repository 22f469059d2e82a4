"""Graceful operation of the real daemon process (``python -m proxy serve``): SIGTERM drains
in-flight pulls within ``shutdown_grace`` and exits 0, ``/readyz`` turns unready first, and
SIGHUP reloads instead of killing the process.

The upstream is the fault-knob origin (``tests/support/origin.py``) serving a blob slowly
(``chunk_delay``), in a thread with its own event loop, so the pull is still running when the
signal arrives. Kubernetes sends SIGTERM at the same time as it starts removing the pod from
the Service's endpoints (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from tests.support.origin import Origin
from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1 << 16  # Origin writes 64 KiB per chunk_delay


class OriginThread:
    """The Origin app on 127.0.0.1 in a background thread (the daemon is another process)."""

    def __init__(self, origin: Origin, headers: dict[str, str] | None = None) -> None:
        self.origin = origin
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        app = origin.app()
        if headers:
            # e.g. Docker Hub's ratelimit-* headers, on every response.
            async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
                response.headers.update(headers)

            app.on_response_prepare.append(add_headers)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._thread = threading.Thread(target=self._loop.run_forever, name="origin", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OriginThread:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]


class Daemon:
    """``python -m proxy serve`` as a subprocess, configured through a YAML file."""

    def __init__(self, tmp: Path, upstream: str, **settings: object) -> None:
        self.port = free_port()
        self.log = tmp / "daemon.log"
        self.config = tmp / "config.yaml"
        config: dict[str, object] = {
            "listen": f"127.0.0.1:{self.port}",
            "cache": {"dir": str(tmp / "cache")},
            "upstreams": [{"name": "docker.io", "url": upstream}],
            "timeouts": {"connect": "2s", "read": "10s", "retries": 1, "backoff": "10ms"},
            "log": {"level": "info", "format": "json"},
            **settings,
        }
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Daemon:
        env_cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config)]
        self.proc = start_daemon(env_cmd, stdout=self.log, stderr=self.log, cwd=ROOT)
        wait_until(lambda: http_status(self.url("/readyz")) == 200, timeout=15, what="pullgate",
                   proc=self.proc, log=self.log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_daemon(self.proc, grace=5)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pullgate still running {timeout}s after the signal\n{self.events_text()}")

    def events(self) -> list[dict[str, object]]:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def events_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture
def slow_origin() -> Iterator[OriginThread]:
    origin = Origin(chunk_delay=0.05)
    with OriginThread(origin) as running:
        yield running


def open_blob(daemon: Daemon, digest: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", f"/v2/library/app/blobs/{digest}?ns=docker.io")
    response = conn.getresponse()
    assert response.status == 200, response.read()[:500]
    return conn, response


def read_rest(response: http.client.HTTPResponse) -> bytes:
    chunks = []
    with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
        while chunk := response.read1(CHUNK):
            chunks.append(chunk)
    return b"".join(chunks)


def test_sigterm_lets_a_running_blob_download_finish_then_exits_0(
    slow_origin: OriginThread, tmp_path: Path
) -> None:
    image = slow_origin.origin.add_image("library/app", "1", layers=[3 << 20])  # ~48 chunks: ~2.4 s
    layer = image.layers[0]
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    with Daemon(tmp_path, slow_origin.url, shutdown_grace="20s") as daemon:
        conn, response = open_blob(daemon, digest)
        head = response.read(CHUNK)
        daemon.signal(signal.SIGTERM)
        signalled = time.monotonic()
        body = head + read_rest(response)
        conn.close()
        code = daemon.wait(20)
        drained = time.monotonic() - signalled
    assert len(body) == len(layer), f"got {len(body)} of {len(layer)} bytes\n{daemon.events_text()}"
    assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    assert code == 0, daemon.events_text()
    assert drained < 15, f"drain took {drained:.1f}s"
    names = [e.get("event") for e in daemon.events()]
    assert names.index("shutdown_started") < names.index("shutdown_complete")


def test_sigterm_gives_up_after_the_grace_period(slow_origin: OriginThread, tmp_path: Path) -> None:
    """A pull longer than ``shutdown_grace`` is cut off there: the process still exits 0,
    promptly, and the client sees a short body (it retries against another replica)."""
    image = slow_origin.origin.add_image("library/app", "1", layers=[8 << 20])  # ~6.4 s
    digest = "sha256:" + hashlib.sha256(image.layers[0]).hexdigest()
    with Daemon(tmp_path, slow_origin.url, shutdown_grace="1s") as daemon:
        conn, response = open_blob(daemon, digest)
        head = response.read(CHUNK)
        daemon.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = daemon.wait(10)
        elapsed = time.monotonic() - signalled
        body = head + read_rest(response)
        conn.close()
    assert code == 0, daemon.events_text()
    assert elapsed < 5, f"exit took {elapsed:.1f}s with shutdown_grace 1s"
    assert len(body) < len(image.layers[0])


def test_readyz_turns_unready_while_draining(slow_origin: OriginThread, tmp_path: Path) -> None:
    """During the drain, ``/readyz`` answers 503 (the Service stops routing new pulls here)
    while the in-flight pull continues."""
    image = slow_origin.origin.add_image("library/app", "1", layers=[3 << 20])
    digest = "sha256:" + hashlib.sha256(image.layers[0]).hexdigest()
    with Daemon(tmp_path, slow_origin.url, shutdown_grace="20s") as daemon:
        conn, response = open_blob(daemon, digest)
        response.read(CHUNK)
        daemon.signal(signal.SIGTERM)
        time.sleep(0.3)
        status = http_status(daemon.url("/readyz"))
        read_rest(response)
        conn.close()
        daemon.wait(20)
    assert status == 503, f"/readyz during drain answered {status} (None: connection refused)"


def test_sighup_reloads_instead_of_exiting(slow_origin: OriginThread, tmp_path: Path) -> None:
    """SIGHUP re-reads the config file and policies; the process keeps serving."""
    with Daemon(tmp_path, slow_origin.url) as daemon:
        daemon.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert daemon.proc is not None
        alive = daemon.proc.poll() is None
        status = http_status(daemon.url("/readyz")) if alive else None
    assert alive, f"pullgate exited on SIGHUP with {daemon.proc.returncode}\n{daemon.events_text()}"
    assert status == 200
