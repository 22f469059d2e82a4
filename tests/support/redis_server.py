"""A real Redis: Debian's ``redis-server`` 7.0 on loopback, in memory only.

Started once per test session (well under a second); tests keep out of each other's way
with a unique key prefix. ``stop``/``start`` keep the port, so a test can take Redis away
and bring it back (the data is gone: ``--save ""`` and no AOF).
Reference: https://redis.io/docs/latest/operate/oss_and_stack/management/config/
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.support.procs import free_port, start_daemon, stop_daemon, wait_until

START_TIMEOUT = 10.0
BINARY = "redis-server"


def missing() -> str | None:
    """Why the engine cannot run here, or None."""
    if shutil.which(BINARY) is None:
        return f"{BINARY} is not installed (apt-get install redis-server; .ci/run installs it)"
    return None


class RedisServer:
    def __init__(self, workdir: Path, *, port: int | None = None, password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        args = [
            BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--protected-mode", "yes", "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        self._proc = start_daemon(args, stdout=self.log_path, stderr=self.log_path)
        wait_until(self._answers, timeout=START_TIMEOUT, what=f"redis-server on {self.port}",
                   proc=self._proc, log=self.log_path)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                # Without the password Redis answers -NOAUTH: it is up all the same.
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            stop_daemon(self._proc)
            self._proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
