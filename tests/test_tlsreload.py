"""Reloading TLS: the watcher swaps certificates when the files change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from proxy.errors import ConfigError
from proxy.http.tls import ReloadingTLS
from proxy.ops.metrics import Metrics
from tests.support.certs import write_cert
from tests.support.polling import eventually


async def test_watcher_reloads_on_change(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, serial=1)
    tls = ReloadingTLS(cert, key, structlog.get_logger(), Metrics(CollectorRegistry()), interval=0.01)
    first = tls._current
    with structlog.testing.capture_logs() as logs:
        async with tls.running():
            write_cert(tmp_path, serial=2)
            stamp = cert.stat().st_mtime_ns + 1_000_000_000
            os.utime(cert, ns=(stamp, stamp))
            await eventually(lambda: tls._current is not first)
    assert [e["event"] for e in logs] == ["admission_tls_reloaded"]


@pytest.mark.parametrize("broken", ["missing", "garbage"])
def test_unloadable_files_at_start(tmp_path: Path, broken: str) -> None:
    cert, key = write_cert(tmp_path, serial=1)
    if broken == "missing":
        key.unlink()
    else:
        cert.write_text("garbage")
    with pytest.raises(ConfigError, match=r"admission\.tls_cert: cannot load"):
        ReloadingTLS(cert, key, structlog.get_logger(), Metrics(CollectorRegistry()))
