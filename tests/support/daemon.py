"""pullgate as a real process (``python -m proxy serve``), and an upstream to point it at,
for what an in-process app cannot show: signals (SIGTERM drain, SIGHUP reload, SIGKILL mid
download) and a restart on the same cache, or a real Prometheus scraping it.

``OriginThread`` runs the fault-knob ``Origin`` app in a background thread with its own
event loop, so a blocking client in the test and the daemon subprocess can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.support.origin import Origin
from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until

ROOT = Path(__file__).resolve().parents[2]


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
    """``python -m proxy serve`` as a subprocess, configured through a YAML file.

    ``port``: listen there (a replica advertises its URL in its own config, so the caller
    picks the port first); ``env``: variables added to the daemon's environment (secrets
    named by ``*_env`` settings, e.g. the S3 keys)."""

    def __init__(
        self, tmp: Path, upstream: str, *, port: int | None = None, env: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.env = dict(env or {})
        self.log = tmp / "daemon.log"
        self.config = tmp / "config.yaml"
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "cache": {"dir": str(tmp / "cache")},
            "upstreams": [{"name": "docker.io", "url": upstream}],
            "timeouts": {"connect": "2s", "read": "10s", "retries": 1, "backoff": "10ms"},
            "log": {"level": "info", "format": "json"},
            "shutdown_delay": "0s",  # tests that need the unready window set it
            **settings,
        }
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> Daemon:
        """Start (or restart, on the same port and cache) and, with ``wait``, poll the plain
        HTTP ``/readyz`` until ready (a TLS listener's test polls on its own)."""
        command = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config)]
        env = {**os.environ, **self.env} if self.env else None
        self.proc = start_daemon(command, stdout=self.log, stderr=self.log, cwd=ROOT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15) -> None:
        """Poll the plain HTTP ``/readyz`` until it answers 200 (fails if the process died)."""
        wait_until(lambda: http_status(self.url("/readyz")) == 200, timeout=timeout, what="pullgate",
                   proc=self.proc, log=self.log)  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            stop_daemon(self.proc, grace=5)
            self.proc = None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit status."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
