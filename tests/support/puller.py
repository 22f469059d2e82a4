"""One node's image pull against a set of replicas, retrying like containerd: the manifest by
tag, then every blob (config, layers) in turn; when a replica fails mid-blob (refused, reset,
a 5xx, a short body) the pull goes on at the next replica with ``Range: bytes=N-`` from the
byte it had reached (containerd's fetcher resumes the same way; RFC 9110 14.2). Every byte
is hashed and each blob must match its digest.

Blocking (``http.client``, one keep-alive connection per replica) so a benchmark or test can
run dozens in threads: socket reads and hashing release the GIL.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.support.images import DOCKER_INDEX, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, ImageInfo

ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_INDEX))
_BUFFER = 1 << 20
_RETRY_PAUSE = 0.1  # seconds before the next replica (containerd backs off too)


@dataclass
class Failure:
    replica: str
    what: str  # digest or "manifest"
    offset: int  # bytes of that blob received before the failure
    reason: str


@dataclass
class PullResult:
    ok: bool = False
    bytes: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    resumed: list[tuple[str, int]] = field(default_factory=list)  # (digest, offset) of each 206 resume
    error: str | None = None


class _Failed(Exception):
    pass


class Puller:
    def __init__(self, replicas: list[str], first: int, *, timeout: float = 60.0, attempts: int = 10,
                 verify: bool = True) -> None:
        self._replicas = replicas
        self._at = first % len(replicas)
        self._timeout = timeout
        self._attempts = attempts
        self._verify = verify
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._buffer = memoryview(bytearray(_BUFFER))
        self.result = PullResult()

    def pull(self, image: ImageInfo, repo: str, tag: str) -> PullResult:
        started = time.monotonic()
        try:
            manifest = self._manifest(repo, tag)
            if hashlib.sha256(manifest).hexdigest() != image.manifest_digest.removeprefix("sha256:"):
                raise _Failed(f"manifest by tag is not {image.manifest_digest}")
            sizes = (len(image.config_bytes), *image.layer_sizes)
            for digest, size in zip(image.blob_digests, sizes, strict=True):
                self._blob(repo, digest, size)
            self.result.ok = True
        except _Failed as exc:
            self.result.error = str(exc)
        finally:
            for conn in self._conns.values():
                conn.close()
            self.result.seconds = time.monotonic() - started
        return self.result

    # --- one replica at a time ----------------------------------------------------------
    @property
    def _replica(self) -> str:
        return self._replicas[self._at]

    def _next_replica(self) -> None:
        self._conns.pop(self._replica, None)
        self._at = (self._at + 1) % len(self._replicas)
        time.sleep(_RETRY_PAUSE)

    def _conn(self) -> http.client.HTTPConnection:
        conn = self._conns.get(self._replica)
        if conn is None:
            parts = urlsplit(self._replica)
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=self._timeout)
            self._conns[self._replica] = conn
        return conn

    def _fail(self, what: str, offset: int, reason: str) -> None:
        self.result.failures.append(Failure(self._replica, what, offset, reason))
        conn = self._conns.get(self._replica)
        if conn is not None:
            conn.close()
        if len(self.result.failures) >= self._attempts:
            raise _Failed(f"gave up after {len(self.result.failures)} failures: {self.result.failures[-1]}")
        self._next_replica()

    def _manifest(self, repo: str, tag: str) -> bytes:
        while True:
            try:
                conn = self._conn()
                conn.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
                response = conn.getresponse()
                body = response.read()
                if response.status == 200:
                    return body
                self._fail("manifest", 0, f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self._fail("manifest", 0, exc.__class__.__name__)

    def _blob(self, repo: str, digest: str, size: int) -> None:
        hasher = hashlib.sha256() if self._verify else None
        got = 0
        while got < size or size == 0:
            headers = {"Range": f"bytes={got}-"} if got else {}
            try:
                conn = self._conn()
                conn.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
                response = conn.getresponse()
                if response.status == 200 and got:  # the replica ignored Range: start over
                    got, hasher = 0, hashlib.sha256() if self._verify else None
                elif response.status == 206:
                    first = response.getheader("Content-Range", "").removeprefix("bytes ").partition("-")[0]
                    if first != str(got):
                        response.read()
                        self._fail(digest, got, f"Content-Range {first} for a resume at {got}")
                        continue
                    self.result.resumed.append((digest, got))
                elif response.status != 200:
                    response.read()
                    self._fail(digest, got, f"status {response.status}")
                    continue
                while n := response.readinto(self._buffer):
                    got += n
                    if hasher is not None:
                        hasher.update(self._buffer[:n])
                if got < size:
                    self._fail(digest, got, "short body")
                    continue
            except (OSError, http.client.HTTPException) as exc:
                self._fail(digest, got, exc.__class__.__name__)
                continue
            break
        self.result.bytes += got
        if got != size:
            raise _Failed(f"{digest}: {got} bytes, expected {size}")
        if hasher is not None and f"sha256:{hasher.hexdigest()}" != digest:
            raise _Failed(f"{digest}: the bytes do not match the digest")


def pull(replicas: list[str], first: int, image: ImageInfo, repo: str, tag: str, *, verify: bool = True,
         timeout: float = 60.0) -> PullResult:
    """One client's whole pull, starting at ``replicas[first]``."""
    return Puller(replicas, first, timeout=timeout, verify=verify).pull(image, repo, tag)


def spread(count: int, replicas: int, seed: int = 17) -> list[int]:
    """Where each of ``count`` clients starts: random, but every replica gets some."""
    rng = random.Random(seed)
    starts = [i % replicas for i in range(count)]
    rng.shuffle(starts)
    return starts
