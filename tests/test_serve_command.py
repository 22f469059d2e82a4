"""``pullgate serve`` failing to start, as a user sees it: one clear line naming the config
key, the right exit status, and nothing else (no ``RuntimeError: generator didn't stop
after athrow()``, no ``Unclosed client session``)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.cli.serve_command import raise_open_files_limit
from tests.support.procs import Completed, free_port, http_status, run, start_daemon, stop_daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, **settings: object) -> Path:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "cache": {"dir": str(tmp_path / "cache")},
        "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
        "log": {"level": "info", "format": "json"},
        "shutdown_delay": "0s",
        **settings,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path, *, wrap: list[str] | None = None) -> Completed:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return run([*(wrap or []), sys.executable, "-m", "proxy", "serve", "--config", str(config)],
               timeout=30, check=False, env=env)  # fmt: skip


def events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines()]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("key", "before"),
    [
        ("listen", []),  # bound first: nothing was opened
        ("admission.listen", ["cache_opened"]),  # the webhook's port, after the cache opened
    ],
)
def test_busy_port_is_one_clear_line_and_exit_1(tmp_path: Path, busy_port: int, key: str, before: list[str]) -> None:
    if key == "listen":
        config = write_config(tmp_path, listen=f"127.0.0.1:{busy_port}")
    else:
        config = write_config(tmp_path, admission={"enabled": True, "listen": f"127.0.0.1:{busy_port}"})
    result = serve(config)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    logged = events(result.stderr)  # every line is a JSON event: no traceback, no warning text
    assert [e["event"] for e in logged] == [*before, "listen_failed"]
    failed = logged[-1]
    assert {k: failed[k] for k in ("key", "address", "error", "level")} == {
        "key": key,
        "address": f"127.0.0.1:{busy_port}",
        "error": "address already in use",
        "level": "error",
    }


def test_impossible_cache_dir_names_the_key_and_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    result = serve(write_config(tmp_path, cache={"dir": str(cache)}))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"pullgate: config error: cache.dir: {cache} is not writable (not a directory)\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="mounting needs root and unshare")
@pytest.mark.parametrize("existing", [False, True], ids=["new-cache", "existing-cache"])
def test_read_only_cache_dir_names_the_key_and_the_path(tmp_path: Path, existing: bool) -> None:
    """A read-only volume (in a private mount namespace: the machine's mounts stay as they
    are). An existing cache on it opens without error until the first write: the start
    probes for that."""
    mount = tmp_path / "ro"
    mount.mkdir()
    cache = mount / "cache"
    setup = ""
    if existing:
        # Build a cache on a writable tmpfs, then remount it read-only.
        setup = f"mkdir -p {cache}/blobs {cache}/tmp && : > {cache}/catalog.db && mount -o remount,ro {mount} && "
    options = "size=1m" if existing else "ro,size=1m"
    wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} none {mount} && {setup}exec "$0" "$@"']
    result = serve(write_config(tmp_path, cache={"dir": str(cache)}), wrap=wrap)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr == f"pullgate: config error: cache.dir: {cache} is not writable (read-only file system)\n"


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """Each blob being sent holds four descriptors: a soft limit of 1024 must not cap a fan-out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY and hard > 600
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_serve_runs_with_the_raised_limit(tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1])); sys.argv = ['pullgate', 'serve', '--listen', sys.argv[1]]; "
        "runpy.run_module('proxy', run_name='__main__')"
    )
    log = tmp_path / "serve.log"
    proc = start_daemon([sys.executable, "-c", script, f"127.0.0.1:{port}"], stdout=log, stderr=log, cwd=tmp_path)
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/v2/", timeout=1.0) == 200, timeout=20,
                   what="pullgate", proc=proc, log=log)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        soft, hard = line.split()[3:5]
        assert soft == hard != "256"
    finally:
        stop_daemon(proc)
