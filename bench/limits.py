"""The machine's serving limits, measured beside pullgate in the same run, so the benchmark
reports ratios against what this hardware can do at all rather than absolute numbers:

- ``TrivialServer``: a bare aiohttp handler returning fixed bytes with the same headers a
  manifest response carries (``access_log=None``, no middleware) — the framework's limit for
  a warm manifest request.
- ``Nginx``: nginx with ``sendfile`` (one worker, like pullgate's one process) serving a
  blob file from disk — the limit for fanning a warm blob out to many clients.

Both run as their own processes on 127.0.0.1 and stop with the ``with`` block.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until

_TRIVIAL = textwrap.dedent(
    """
    import sys
    from aiohttp import web
    body = open(sys.argv[2], "rb").read()
    headers = {"Content-Type": sys.argv[3], "Docker-Content-Digest": sys.argv[4],
               "Docker-Distribution-API-Version": "registry/2.0"}
    async def handler(request):
        return web.Response(body=body, headers=headers)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
    """
)


class _Process:
    url: str
    _proc: subprocess.Popen[bytes] | None = None

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_daemon(self._proc)
            self._proc = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid


class TrivialServer(_Process):
    def __init__(self, workdir: Path, body: bytes, media_type: str, digest: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._body = workdir / "body"
        self._body.write_bytes(body)
        self._args = (media_type, digest)
        self._log = workdir / "trivial.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TrivialServer:
        command = [sys.executable, "-c", _TRIVIAL, str(self.port), str(self._body), *self._args]
        self._proc = start_daemon(command, stdout=self._log, stderr=self._log)
        wait_until(lambda: http_status(f"{self.url}/v2/", timeout=1.0) == 200, timeout=20,
                   what="trivial aiohttp server", proc=self._proc, log=self._log)
        return self


class Nginx(_Process):
    """Serves ``root`` (a tree laid out like the URL paths) with sendfile, one worker."""

    def __init__(self, workdir: Path, root: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._dir = workdir
        self._log = workdir / "nginx.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Started as root, nginx's worker would switch to an unprivileged user that cannot
        # read the benchmark's private temp dir: keep the worker as the caller.
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(textwrap.dedent(f"""
            {user}
            worker_processes 1;
            pid {workdir}/nginx.pid;
            error_log {workdir}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                sendfile on;
                tcp_nopush on;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                fastcgi_temp_path {workdir}/fastcgi;
                uwsgi_temp_path {workdir}/uwsgi;
                scgi_temp_path {workdir}/scgi;
                default_type application/octet-stream;
                server {{
                    listen 127.0.0.1:{self.port};
                    root {root};
                    location = /healthz {{ return 200; }}
                }}
            }}
        """))

    def __enter__(self) -> Nginx:
        command = ["nginx", "-p", str(self._dir), "-c", str(self._dir / "nginx.conf"), "-g", "daemon off;"]
        self._proc = start_daemon(command, stdout=self._log, stderr=self._log)
        wait_until(lambda: http_status(f"{self.url}/healthz", timeout=1.0) == 200, timeout=20,
                   what="nginx", proc=self._proc, log=self._log)
        return self
