"""What every real S3-API engine in the tests offers: an endpoint on loopback, one user's
keys, and a plain (blocking) botocore client for fixtures that create buckets or look at
what a test left behind. The engines themselves: ``seaweedfs.py``, ``radosgw.py``."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

from tests.support.procs import stop_daemon

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Keys:
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))


class S3Engine:
    """Base of the engine fixtures: processes to stop, a port, keys, a sync client."""

    name = "s3"
    stop_grace = 3.0  # seconds from SIGTERM to SIGKILL; the data is disposable

    def __init__(self, workdir: Path, port: int, keys: S3Keys | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.keys = keys or S3Keys()
        self.startup_seconds = 0.0  # measured by start(), reported by the tests
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def client(self) -> Any:
        """A blocking botocore S3 client for fixtures and assertions (not for code under test)."""
        config = botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5, read_timeout=30, proxies={},
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )  # fmt: skip
        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, config=config,
            aws_access_key_id=self.keys.access_key, aws_secret_access_key=self.keys.secret_key,
        )  # fmt: skip

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def pause(self) -> None:
        """SIGSTOP the S3 gateway (started last): connections hang, nothing is refused."""
        os.killpg(self._procs[-1].pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self._procs[-1].pid, signal.SIGCONT)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            stop_daemon(proc, grace=self.stop_grace)
        self._procs.clear()

    def __exit__(self, *exc: object) -> None:
        self.stop()
