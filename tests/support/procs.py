"""Small process helpers for the real-component fixtures: free ports, commands with
timeouts (blocking and asyncio flavours), readiness polling and clean shutdown.

The asyncio flavour matters: when the mirror under test runs as an aiohttp app in the
test's own event loop, a blocking ``subprocess.run(["skopeo", ...])`` against it would
deadlock the loop, so every client command also has an ``a``-prefixed coroutine twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_POLL_INTERVAL = 0.02
_PR_SET_PDEATHSIG = 1
# Loopback only: never route through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel picks; racy but fine in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Completed:
    args: tuple[str, ...]
    returncode: int
    stdout_bytes: bytes
    stderr_bytes: bytes

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")


class CommandError(AssertionError):
    """A client command failed or timed out; the message carries its output for the report.

    An AssertionError so a failing client shows up as a test failure, not an error.
    """

    def __init__(self, args: Sequence[str], detail: str, stdout: str, stderr: str) -> None:
        self.args_ = tuple(args)
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{' '.join(args)}: {detail}\n--- stdout:\n{_tail(stdout)}"
                         f"\n--- stderr:\n{_tail(stderr)}")


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _check(result: Completed, check: bool) -> Completed:
    if check and result.returncode != 0:
        raise CommandError(result.args, f"exit status {result.returncode}", result.stdout,
                           result.stderr)
    return result


def run(args: Sequence[str], *, timeout: float, check: bool = True,
        env: Mapping[str, str] | None = None, cwd: Path | None = None,
        stdin: bytes | None = None) -> Completed:
    """Run a command to completion; its whole process group is killed on timeout."""
    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                            env=_env(env), start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise CommandError(args, f"timed out after {timeout}s", out.decode(errors="replace"),
                           err.decode(errors="replace")) from None
    result = Completed(tuple(args), proc.returncode, out, err)
    return _check(result, check)


async def arun(args: Sequence[str], *, timeout: float, check: bool = True,
               env: Mapping[str, str] | None = None) -> Completed:
    """``run`` without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=_env(env), start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise CommandError(args, f"timed out after {timeout}s", "", "") from None
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        await proc.wait()
        raise
    result = Completed(tuple(args), proc.returncode if proc.returncode is not None else -1,
                       out, err)
    return _check(result, check)


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if extra is None else {**os.environ, **extra}


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGKILL): a killed pytest must not leave daemons behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_daemon(args: Sequence[str], *, stdout: Path, stderr: Path,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running server in its own session, output appended to files
    (``env``: the whole environment, when given).

    Call from the main thread: the daemon is killed when the starting thread exits.
    """
    with stdout.open("ab") as out, stderr.open("ab") as err:
        return subprocess.Popen(list(args), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=None if env is None else dict(env),
                                start_new_session=True, preexec_fn=_die_with_parent)


def stop_daemon(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """SIGTERM the daemon's process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
    # A daemon's helpers (e.g. containerd shims) may outlive it in the group.
    _kill_group(proc.pid)


def wait_until(ready: Callable[[], bool], *, timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll ``ready`` until true; fail early with the log tail when ``proc`` has died."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout}s\n{_log_tail(log)}")
        time.sleep(_POLL_INTERVAL)


def _log_tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return _tail(log.read_text(errors="replace"))


def http_status(url: str, *, timeout: float = 2.0) -> int | None:
    """Status of a GET to ``url``; None when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None
