"""pullgate as a real process (``python -m proxy serve``), for what an in-process app
cannot show: SIGKILL at any moment and a restart on the same cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until


class PullgateProcess:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = {"listen": f"127.0.0.1:{self.port}", "log": {"level": "info"}, **config}
        self.config_path = workdir / "pullgate.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "pullgate.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> PullgateProcess:
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)]
        self.proc = start_daemon(args, stdout=self.log_path, stderr=self.log_path, cwd=Path(__file__).parents[2])
        wait_until(
            lambda: http_status(f"{self.url}/healthz", timeout=1.0) == 200,
            timeout=20,
            what="pullgate",
            proc=self.proc,
            log=self.log_path,
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def stop(self) -> None:
        if self.proc is not None:
            stop_daemon(self.proc)
            self.proc = None

    def __enter__(self) -> PullgateProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
