"""Graceful operation of the real daemon process (``python -m proxy serve``): SIGTERM drains
in-flight pulls within ``shutdown_grace`` and exits 0, ``/readyz`` turns unready first, and
SIGHUP reloads instead of killing the process.

The upstream is the fault-knob origin (``tests/support/origin.py``) serving a blob slowly
(``chunk_delay``), in a thread with its own event loop, so the pull is still running when the
signal arrives. Kubernetes sends SIGTERM at the same time as it starts removing the pod from
the Service's endpoints (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.daemon import Daemon, OriginThread
from tests.support.origin import Origin
from tests.support.procs import http_status, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1 << 16  # Origin writes 64 KiB per chunk_delay


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


def test_sigterm_lets_a_running_blob_download_finish_then_exits_0(slow_origin: OriginThread, tmp_path: Path) -> None:
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
    """For ``shutdown_delay`` after SIGTERM, ``/readyz`` answers 503 (the Service stops
    routing new pulls here) while the port still accepts and the in-flight pull continues."""
    image = slow_origin.origin.add_image("library/app", "1", layers=[3 << 20])
    digest = "sha256:" + hashlib.sha256(image.layers[0]).hexdigest()
    with Daemon(tmp_path, slow_origin.url, shutdown_grace="20s", shutdown_delay="2s") as daemon:
        conn, response = open_blob(daemon, digest)
        head = response.read(CHUNK)
        daemon.signal(signal.SIGTERM)
        time.sleep(0.3)
        status = http_status(daemon.url("/readyz"))
        alive = http_status(daemon.url("/healthz"))
        body = head + read_rest(response)
        conn.close()
        code = daemon.wait(20)
    assert status == 503, f"/readyz during drain answered {status} (None: connection refused)"
    assert alive == 200, "still accepting during shutdown_delay"
    assert len(body) == len(image.layers[0]) and code == 0


def test_sighup_reloads_instead_of_exiting(slow_origin: OriginThread, tmp_path: Path) -> None:
    """SIGHUP re-reads the config file (and policies); the process keeps serving."""
    with Daemon(tmp_path, slow_origin.url) as daemon:
        config = yaml.safe_load(daemon.config.read_text())
        config["log"]["level"] = "debug"
        daemon.config.write_text(yaml.safe_dump(config))
        daemon.signal(signal.SIGHUP)
        assert daemon.proc is not None
        wait_until(
            lambda: "config_reloaded" in [e.get("event") for e in daemon.events()],
            timeout=10,
            what="config_reloaded event",
            proc=daemon.proc,
            log=daemon.log,
        )
        status = http_status(daemon.url("/readyz"))
        alive = daemon.proc.poll() is None
    assert alive, f"pullgate exited on SIGHUP with {daemon.proc.returncode}\n{daemon.events_text()}"
    assert status == 200
