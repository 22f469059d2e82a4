"""The content-addressed blob store on local disk: one file per digest, shared by every
upstream and repository.

Bytes land in ``tmp/`` first and are renamed into ``blobs/<alg>/<aa>/<hex>`` only after
their digest was verified and the file fsynced, so a file under ``blobs/`` is always
complete and correct; a crash leaves at most a stray temp file, removed on the next start.

Reading, writing, fsync and directory walks run in a worker thread (``asyncio.to_thread``):
on a slow or busy disk any of them can take long enough to stall every client of the event
loop. ``size`` (one ``stat``, answered from the inode cache) stays inline: it is on every
cached blob request. ``read_blocking`` is for the CLI tools, which run no event loop.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from proxy.oci.digest import Digest


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"

    async def open(self) -> None:
        await asyncio.to_thread(self.open_blocking)

    def open_blocking(self) -> None:
        """Create the layout and drop temp files a crash left behind.

        Temp files carry their writer's PID: several processes share one cache (the daemon
        and the CLI's ``warm``/``import``), so only files whose writer is gone are swept.
        """
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for stray in self.tmp.iterdir():
            if not _writer_alive(stray.name):
                stray.unlink(missing_ok=True)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def size(self, digest: Digest) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def read(self, digest: Digest) -> bytes | None:
        return await asyncio.to_thread(self.read_blocking, digest)

    def read_blocking(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def temp_path(self) -> Path:
        return self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.part"

    async def commit(self, temp: Path, digest: Digest, fd: int | None = None) -> Path:
        """fsync ``temp`` (via ``fd`` if open) and move it to its final place atomically.

        fsync runs in a thread: on a busy disk it can take long enough to stall every other
        client of the event loop.
        """
        final = self.path(digest)
        await asyncio.to_thread(self._sync_and_rename, temp, final, fd)
        return final

    @staticmethod
    def _sync_and_rename(temp: Path, final: Path, fd: int | None) -> None:
        if fd is not None:
            os.fsync(fd)
        else:
            with temp.open("rb") as f:
                os.fsync(f.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def put(self, data: bytes, digest: Digest) -> Path:
        """Store small verified content (manifests) in one go."""
        return await asyncio.to_thread(self._put, data, digest)

    def _put(self, data: bytes, digest: Digest) -> Path:
        temp, final = self.temp_path(), self.path(digest)
        try:
            with temp.open("wb") as f:
                f.write(data)
                f.flush()
                self._sync_and_rename(temp, final, f.fileno())
        finally:
            temp.unlink(missing_ok=True)
        return final

    async def remove(self, digest: Digest) -> int:
        return await asyncio.to_thread(self.remove_blocking, digest)

    def remove_blocking(self, digest: Digest) -> int:
        """Delete a blob; returns the bytes freed (0 if it was not there)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    async def scan(self) -> list[tuple[Digest, int]]:
        """Every stored blob with its size (used to reconcile the catalog at startup)."""
        return await asyncio.to_thread(lambda: list(self.scan_blocking()))

    def scan_blocking(self) -> Iterator[tuple[Digest, int]]:
        for algorithm_dir in self.blobs.iterdir():
            for prefix in algorithm_dir.iterdir():
                for entry in prefix.iterdir():
                    yield Digest(algorithm_dir.name, entry.name), entry.stat().st_size

    def writable(self) -> bool:
        """Can a file be created in ``tmp/``? (``/readyz``; a few µs on a healthy disk.)"""
        probe = self.tmp / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True


def _writer_alive(name: str) -> bool:
    pid, sep, _ = name.partition("-")
    if not sep or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True
