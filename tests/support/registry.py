"""A real upstream: CNCF Distribution 2.8 (Debian's ``docker-registry``) on loopback.

Distribution writes its access log (Apache combined format, gorilla/handlers) to stdout
and its application log (logrus) to stderr; both go to files in the work dir. One line
per request, written when the handler returns, e.g. (see tests/data/distribution-access.log)::

    127.0.0.1 - - [24/Nov/2026:03:15:11 +0000] "GET /v2/library/app/blobs/sha256:c05d...?ns=docker.io
    HTTP/1.1" 200 10263 "" "containerd/1.6.20~ds1"     <- one line in the file

``count_requests`` parses those lines so tests can assert how often the mirror went
upstream. Config reference: https://distribution.github.io/distribution/about/configuration/
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import skopeo
from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until
from tests.support.tokenserver import TokenServer

START_TIMEOUT = 15.0
_SETTLE = 0.1  # the log line lands just after the response: wait this long for quiet
_SETTLE_MAX = 3.0
_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>\S+) (?P<target>\S+) (?P<protocol>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r' "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class AccessLogEntry:
    remote: str
    time: str
    method: str
    target: str  # path and query as requested
    protocol: str
    status: int
    size: int
    user_agent: str

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


def parse_access_line(line: str) -> AccessLogEntry | None:
    match = _LINE.match(line)
    if match is None:
        return None
    size = match["size"]
    return AccessLogEntry(match["remote"], match["time"], match["method"], match["target"],
                          match["protocol"], int(match["status"]),
                          0 if size == "-" else int(size), match["agent"])


class Registry:
    """One ``docker-registry serve`` process; ``stop``/``start`` keep port and storage."""

    def __init__(self, workdir: Path, *, port: int | None = None,
                 token_server: TokenServer | None = None, proxy_remoteurl: str | None = None,
                 proxy_creds: tuple[str, str] | None = None,
                 extra_config: Mapping[str, Any] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.token_server = token_server
        self.storage = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.access_log_path = workdir / "access.log"
        self.app_log_path = workdir / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None
        config = self._config(proxy_remoteurl, proxy_creds)
        config.update(extra_config or {})
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _config(self, proxy_remoteurl: str | None,
                proxy_creds: tuple[str, str] | None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "pullgate-test-secret"},
        }
        if self.token_server is not None:
            config["auth"] = self.token_server.registry_auth_config(
                self.workdir / "token-root.pem")
        if proxy_remoteurl is not None:
            config["proxy"] = {"remoteurl": proxy_remoteurl}
            if proxy_creds is not None:
                config["proxy"].update(username=proxy_creds[0], password=proxy_creds[1])
        return config

    # -- addresses ---------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo_ref: str) -> str:
        """skopeo reference for ``library/app:1`` (or ``library/app@sha256:...``)."""
        return f"docker://{self.host}/{repo_ref}"

    @property
    def creds(self) -> tuple[str, str] | None:
        return None if self.token_server is None else self.token_server.creds

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Registry:
        if self.running:
            return self
        self._proc = start_daemon(["docker-registry", "serve", str(self.config_path)],
                                  stdout=self.access_log_path, stderr=self.app_log_path)
        wait_until(lambda: http_status(f"{self.url}/v2/", timeout=1.0) in (200, 401),
                   timeout=START_TIMEOUT, what=f"docker-registry on {self.host}",
                   proc=self._proc, log=self.app_log_path)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            stop_daemon(self._proc)
            self._proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content -----------------------------------------------------------------------
    def push(self, layout_dir: Path, tag: str | None, repo_ref: str, *, all_images: bool = True,
             creds: tuple[str, str] | None = None, timeout: float = 120.0) -> str:
        """skopeo-copy ``oci:LAYOUT:TAG`` to ``repo_ref``; returns the docker:// reference."""
        dest = self.ref(repo_ref)
        skopeo.copy(skopeo.source_ref(layout_dir, tag), dest, all_images=all_images,
                    dest_creds=creds or self.creds, timeout=timeout)
        return dest

    async def apush(self, layout_dir: Path, tag: str | None, repo_ref: str, *,
                    all_images: bool = True, creds: tuple[str, str] | None = None,
                    timeout: float = 120.0) -> str:
        dest = self.ref(repo_ref)
        await skopeo.acopy(skopeo.source_ref(layout_dir, tag), dest, all_images=all_images,
                           dest_creds=creds or self.creds, timeout=timeout)
        return dest

    def plant_manifest(self, repository: str, tag: str, data: bytes) -> str:
        """Store a manifest under ``tag`` straight in the filesystem driver's layout, without
        the blobs it references: for real signed manifests from test vectors, whose image
        layers we do not have (Distribution refuses such a PUT; serving it by tag or digest
        reads only these files). Returns the digest."""
        hexpart = hashlib.sha256(data).hexdigest()
        digest = f"sha256:{hexpart}"
        blob = self.blob_file(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        manifests = self.storage / "docker" / "registry" / "v2" / "repositories" / repository / "_manifests"
        for link in (
            manifests / "revisions" / "sha256" / hexpart / "link",
            manifests / "tags" / tag / "current" / "link",
            manifests / "tags" / tag / "index" / "sha256" / hexpart / "link",
        ):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.write_text(digest)
        return digest

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (tests corrupt or delete it)."""
        algorithm, _, hexpart = digest.partition(":")
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / algorithm
                / hexpart[:2] / hexpart / "data")

    # -- access log --------------------------------------------------------------------
    def access_log_lines(self) -> list[str]:
        if not self.access_log_path.exists():
            return []
        return self.access_log_path.read_text(errors="replace").splitlines()

    def access_log(self, *, since: int = 0) -> list[AccessLogEntry]:
        entries = (parse_access_line(line) for line in self.access_log_lines()[since:])
        return [e for e in entries if e is not None]

    def mark(self) -> int:
        """Current line count; pass as ``since=`` to count only later requests."""
        self._settle()
        return len(self.access_log_lines())

    async def amark(self) -> int:
        await self._asettle()
        return len(self.access_log_lines())

    def count_requests(self, method: str | None = "GET", path_regex: str = r"^/v2/", *,
                       since: int = 0, status: int | None = None,
                       user_agent: str | None = None) -> int:
        """Requests whose path (no query) matches ``path_regex`` (``re.search``).

        Waits until the log has been quiet for a moment first, because Distribution writes
        a line only after the response has been sent.
        """
        self._settle()
        return self._count(method, path_regex, since, status, user_agent)

    async def acount_requests(self, method: str | None = "GET", path_regex: str = r"^/v2/", *,
                              since: int = 0, status: int | None = None,
                              user_agent: str | None = None) -> int:
        await self._asettle()
        return self._count(method, path_regex, since, status, user_agent)

    def _count(self, method: str | None, path_regex: str, since: int, status: int | None,
               user_agent: str | None) -> int:
        pattern = re.compile(path_regex)
        return sum(1 for e in self.access_log(since=since)
                   if (method is None or e.method == method) and pattern.search(e.path)
                   and (status is None or e.status == status)
                   and (user_agent is None or user_agent in e.user_agent))

    def _log_size(self) -> int:
        return self.access_log_path.stat().st_size if self.access_log_path.exists() else 0

    def _settle(self) -> None:
        deadline = time.monotonic() + _SETTLE_MAX
        size = self._log_size()
        while time.monotonic() < deadline:
            time.sleep(_SETTLE)
            if (new := self._log_size()) == size:
                return
            size = new

    async def _asettle(self) -> None:
        deadline = time.monotonic() + _SETTLE_MAX
        size = self._log_size()
        while time.monotonic() < deadline:
            await asyncio.sleep(_SETTLE)
            if (new := self._log_size()) == size:
                return
            size = new
