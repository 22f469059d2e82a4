"""One upstream blob download shared by every client that asks for the blob meanwhile.

The download writes to a temp file; readers ``pread`` from the same descriptor at their own
offsets and wait for more bytes, so each client streams as bytes arrive, and a client that
starts late (or resumes with ``Range``) reads what is already there at disk speed.

Nobody receives a blob's last byte before its digest is verified: a reader may read up to
``written - 1`` while the download runs. If verification fails, every reader's connection
is cut short of ``Content-Length`` — clients see a truncated transfer, never wrong bytes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from enum import Enum
from pathlib import Path

from proxy.digest import Digest
from proxy.errors import PullgateError

CHUNK = 1 << 18


class State(Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Flight:
    def __init__(self, digest: Digest, temp: Path) -> None:
        self.digest = digest
        self.temp = temp
        self.size: int | None = None  # expected size, once upstream told us
        self.written = 0
        self.state = State.RUNNING
        self.error: PullgateError | None = None
        self.started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._changed = asyncio.Event()
        self._readers = 0
        self._writer_done = False
        self.final: Path | None = None  # where the verified blob lives once committed

    @property
    def fd(self) -> int:
        return self._fd

    # --- writer side ----------------------------------------------------------------------
    def begin(self, size: int | None) -> None:
        self.size = size
        if not self.started.done():
            self.started.set_result(size)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self.written)
            self.written += n
            view = view[n:]
        self._notify()

    def finish(self) -> None:
        self.state = State.DONE
        self._notify()

    def fail(self, error: PullgateError) -> None:
        self.state = State.FAILED
        self.error = error
        if not self.started.done():
            self.started.set_exception(error)
            self.started.exception()  # mark retrieved: nobody may be waiting
        self._notify()

    def writer_closed(self) -> None:
        self._writer_done = True
        self._maybe_close()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # --- reader side ----------------------------------------------------------------------
    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the blob as they become available (and verified, for
        the last one). Raises the download's error if it fails."""
        self._readers += 1
        own_fd = -1
        try:
            fd = self._fd
            if fd < 0:
                # Joined just as the download finished and closed its descriptor.
                if self.state is not State.DONE or self.final is None:
                    raise self.error or PullgateError("download failed")
                fd = own_fd = os.open(self.final, os.O_RDONLY)
            offset = start
            while end is None or offset < end:
                limit = self.written if self.state is State.DONE else max(self.written - 1, 0)
                if end is not None:
                    limit = min(limit, end)
                if offset < limit:
                    data = os.pread(fd, min(limit - offset, CHUNK), offset)
                    offset += len(data)
                    yield data
                elif self.state is State.DONE:
                    return
                elif self.state is State.FAILED:
                    raise self.error or PullgateError("download failed")
                else:
                    await self._changed.wait()
        finally:
            if own_fd >= 0:
                os.close(own_fd)
            self._readers -= 1
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self._writer_done and self._readers == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
