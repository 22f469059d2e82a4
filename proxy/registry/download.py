"""One upstream blob download shared by every client that asks for the blob meanwhile.

The download writes to a temp file; readers ``pread`` from the same descriptor at their own
offsets and wait for more bytes, so each client streams as bytes arrive, and a client that
starts late (or resumes with ``Range``) reads what is already there at disk speed.

Nobody receives a blob's last byte before its digest is verified: a reader may read up to
``written - 1`` while the download runs. If verification fails, every reader's connection
is cut short of ``Content-Length`` — clients see a truncated transfer, never wrong bytes.

Every ``pwrite``/``pread`` and ``open`` runs in a worker thread: a disk that stalls must
stall only the transfers that touch it, never the event loop. What was written and an
attached reader still needs is also kept in memory, up to ``RECENT`` bytes: readers keeping
up with the download (the usual case: clients at the pace of the upstream) take their bytes
from there without a thread hop; a reader further behind reads ``READ_AHEAD`` bytes per hop.

A reader that sends to a plain socket asks for *windows* (``read(windows=True)``): it gets
``FileWindow`` ranges of the file (written, and verified for the last byte) to ``sendfile``
instead of bytes, keeping up or behind alike — the bytes were just written and come from
the page cache, nothing is copied through Python, and the copying runs in the HTTP layer's
sender threads instead of on the event loop next to the download (16 clients of one cold
256 MiB blob: 2.2-2.8 s from memory on the loop, 1.7-2.0 s by windows). A reader keeping
up is given a window once ``EDGE_WINDOW`` bytes are there for it (or ``EDGE_WAIT`` passed,
or the end is written), not each write as it lands. A storm of clients
behind a download costs neither memory nor the thread pool the download's own writes need
(200 clients reading 1 MiB pieces from disk: 510 MiB RSS, writes queued behind hundreds of
reads). Memory is kept for the readers that take bytes (TLS clients, the object-store upload).

The last byte is released as soon as the digest matches (``verified``), before the
writer makes the file durable (fsync, rename): no client waits for the disk flush.

When the disk fills (ENOSPC, EDQUOT, EFBIG) the download goes on in *pass-through* mode:
later bytes are kept in a bounded memory window for the readers already attached, and the
blob is not cached. A reader that falls behind the window is cut off rather than let memory
grow with the blob.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal, overload

from proxy.errors import PullgateError, UpstreamUnavailable
from proxy.oci.digest import Digest

CHUNK = 1 << 18
RECENT = 8 << 20  # at most this much of the download's end is kept in memory for its readers
READ_AHEAD = 1 << 20  # bytes per disk read for readers further behind
# A reader of windows that keeps up with the download waits until this much is written past
# it (or EDGE_WAIT seconds, or the end): sent as the writes come (a few hundred KiB each),
# every client woke for small reads and the senders made small calls (16 clients of a cold
# 256 MiB blob, 4 runs each: pullgate's CPU 1.31 against 1.42 s, the clients' 1.18 against
# 1.30 s; the wall within this machine's noise).
EDGE_WINDOW = 16 << 20
EDGE_WAIT = 0.05
SPILL_WINDOW = 64 << 20  # memory kept for readers of a pass-through download
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_IOV_MAX = 1024  # pieces per pwritev (Linux's IOV_MAX)


@dataclass(frozen=True, slots=True)
class FileWindow:
    """Bytes ``[offset, offset + count)`` of the blob, on disk in descriptor ``fd`` — valid
    (open) until the reader asks for its next piece. Send them with ``os.sendfile`` or
    ``pread``: the descriptor is shared, its file position means nothing."""

    fd: int
    offset: int
    count: int


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
        self._complete = False  # every byte written and verified: readers may take the last one
        self.state = State.RUNNING
        self.error: PullgateError | None = None
        self.started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.final: Path | None = None  # where the verified blob lives once committed
        self.disk_bytes: int | None = None  # set when the disk filled: bytes [0, n) are on disk
        self._fd = -1  # the temp file, opened by the writer (``create``) before ``begin``
        self._changed = asyncio.Event()
        self._readers: dict[int, int] = {}  # reader id -> next offset it needs
        self._windowed: set[int] = set()  # readers given FileWindows: the file, not memory
        self._next_reader = 0
        self._writer_done = False
        self._spill: deque[tuple[int, bytes]] = deque()  # (offset, data) past disk_bytes
        self._spill_bytes = 0
        self._recent: deque[tuple[int, bytes]] = deque()  # (offset, data): the last bytes on disk
        self._recent_bytes = 0

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def spilled(self) -> bool:
        return self.disk_bytes is not None

    # --- writer side ----------------------------------------------------------------------
    async def create(self) -> None:
        """Create the temp file (before ``begin``: readers wait for ``started``)."""
        self._fd = await asyncio.to_thread(os.open, self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def begin(self, size: int | None) -> None:
        self.size = size
        if not self.started.done():
            self.started.set_result(size)

    async def write(self, data: bytes | list[bytes], digest_update: Callable[[bytes], object] | None = None) -> None:
        """Append ``data`` (bytes, or pieces of it in order); ``digest_update`` (the
        download's hasher) sees it first, in the same worker thread as the write (hashing is
        CPU the event loop need not spend). Pieces go to the file in one ``pwritev``: joining
        them on the loop copied every byte once more there, into fresh memory (16 clients of
        a cold 256 MiB blob: a tenth of the loop's samples in that copy)."""
        pieces = [data] if isinstance(data, bytes) else data
        rest = pieces
        if self.disk_bytes is None:
            n, full = await asyncio.to_thread(_pwrite_all, self._fd, pieces, self.written, digest_update)
            kept, rest = _split(pieces, n)
            for piece in kept:
                self._remember(self.written, piece)
                self.written += len(piece)
            if full:
                self.disk_bytes = self.written
        elif digest_update is not None:
            for piece in pieces:
                digest_update(piece)
        for piece in rest:
            self._spill.append((self.written, piece))
            self._spill_bytes += len(piece)
            self.written += len(piece)
        if rest:
            self._trim_spill()
        self._notify()

    def _remember(self, offset: int, data: bytes) -> None:
        if data:
            self._recent.append((offset, data))
            self._recent_bytes += len(data)
        # Drop what every reader from memory is past, and the oldest past the cap. (Readers
        # of windows take the file: they hold nothing here.)
        needed = min(
            (at for reader, at in self._readers.items() if reader not in self._windowed), default=offset + len(data)
        )
        while self._recent and (
            self._recent[0][0] + len(self._recent[0][1]) <= needed
            or self._recent_bytes - len(self._recent[0][1]) >= RECENT
        ):
            self._recent_bytes -= len(self._recent.popleft()[1])

    def _trim_spill(self) -> None:
        needed = min(self._readers.values(), default=self.written)
        while self._spill and (
            self._spill[0][0] + len(self._spill[0][1]) <= needed or self._spill_bytes > SPILL_WINDOW
        ):
            _, dropped = self._spill.popleft()
            self._spill_bytes -= len(dropped)

    def verified(self) -> None:
        """Every byte is written and the digest matched: readers may take the last byte
        (the writer still commits the file; ``finish`` follows)."""
        self._complete = True
        self._notify()

    def finish(self) -> None:
        self.state = State.DONE
        self._complete = True
        self._notify()

    def fail(self, error: PullgateError) -> None:
        self.state = State.FAILED
        self.error = error
        if not self.started.done():
            self.started.set_exception(error)
            self.started.exception()  # mark retrieved: nobody may be waiting
        self._notify()

    async def settled(self) -> State:
        """Wait until the writer is done with the blob: committed to the store (``DONE``; a
        reader may have had every byte a moment before) or ``FAILED``."""
        while self.state is State.RUNNING:
            await self._changed.wait()
        return self.state

    def writer_closed(self) -> None:
        self._writer_done = True
        self._maybe_close()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # --- reader side ----------------------------------------------------------------------
    @overload
    def read(
        self, start: int = 0, end: int | None = None, *, windows: Literal[False] = False
    ) -> AsyncGenerator[bytes | memoryview, None]: ...
    @overload
    def read(
        self, start: int, end: int | None, *, windows: bool
    ) -> AsyncGenerator[bytes | memoryview | FileWindow, None]: ...
    async def read(
        self, start: int = 0, end: int | None = None, *, windows: bool = False
    ) -> AsyncGenerator[bytes | memoryview | FileWindow, None]:
        """Bytes ``[start, end)`` of the blob as they become available (and verified, for
        the last one). With ``windows``, what is on disk comes as ``FileWindow`` ranges of the
        file instead of bytes (what a disk-full download holds only in memory still comes as
        bytes). Raises the download's error if it fails."""
        reader = self._next_reader
        self._next_reader += 1
        self._readers[reader] = start
        if windows:
            self._windowed.add(reader)
        own_fd = -1
        try:
            fd = self._fd
            if fd < 0:
                # Joined just as the download finished and closed its descriptor.
                if self.state is not State.DONE or self.final is None:
                    raise self.error or PullgateError("download failed")
                fd = own_fd = await asyncio.to_thread(os.open, self.final, os.O_RDONLY)
            offset, held_since = start, 0.0
            while end is None or offset < end:
                limit = self.written if self._complete else max(self.written - 1, 0)
                if end is not None:
                    limit = min(limit, end)
                if offset < limit and windows and self._short_of_a_window(offset, limit, end):
                    held_since = held_since or asyncio.get_running_loop().time()
                    if await self._changed_before(held_since + EDGE_WAIT):
                        continue
                if offset < limit:
                    held_since = 0.0
                    data = await self._chunk(fd, offset, limit, windows)
                    offset += data.count if isinstance(data, FileWindow) else len(data)
                    self._readers[reader] = offset
                    yield data
                elif self._complete:
                    return
                elif self.state is State.FAILED:
                    raise self.error or PullgateError("download failed")
                else:
                    await self._changed.wait()
        finally:
            if own_fd >= 0:
                os.close(own_fd)
            del self._readers[reader]
            self._windowed.discard(reader)
            self._maybe_close()

    def _short_of_a_window(self, offset: int, limit: int, end: int | None) -> bool:
        """Whether a reader of windows at ``offset`` should wait for more than the download
        has written (``limit``): less than ``EDGE_WINDOW`` is there, and more is coming."""
        return (
            limit - offset < EDGE_WINDOW
            and not self._complete
            and self.state is State.RUNNING
            and self.disk_bytes is None
            and (end is None or limit < end)
        )

    async def _changed_before(self, deadline: float) -> bool:
        """Wait for the download to change until the loop's clock reads ``deadline``;
        False if it did not."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def _chunk(self, fd: int, offset: int, limit: int, windows: bool) -> bytes | memoryview | FileWindow:
        if self.disk_bytes is None or offset < self.disk_bytes:
            stop = limit if self.disk_bytes is None else min(limit, self.disk_bytes)
            if windows:
                return FileWindow(fd, offset, stop - offset)
            recent = _slice(self._recent, offset, stop)
            if recent is not None:
                return recent
            return await asyncio.to_thread(os.pread, fd, min(stop - offset, READ_AHEAD), offset)
        spilled = _slice(self._spill, offset, limit)
        if spilled is None:
            raise UpstreamUnavailable("client fell behind a pass-through download (cache disk full)")
        return spilled

    def _maybe_close(self) -> None:
        # Runs when the last user is done: no pread/pwrite on this descriptor is in flight.
        if self._writer_done and not self._readers and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _slice(chunks: deque[tuple[int, bytes]], offset: int, limit: int) -> bytes | memoryview | None:
    """Bytes from ``offset`` (up to ``limit``, at most ``CHUNK``) out of the in-memory,
    contiguous ``chunks`` (offset, data), or None when ``offset`` is not held. Searched
    from the end: readers keeping up want the newest. Within one piece the answer is a
    view, not a copy: sixteen readers of one download would otherwise copy every byte
    sixteen times more before the socket copies it once. At most ``CHUNK``: what a client's
    socket does not take at once waits in its transport's buffer, so a storm of slow clients
    holds clients x CHUNK bytes (200 clients at 1 MiB pieces: 600 MiB RSS)."""
    first = None
    for index in range(len(chunks) - 1, -1, -1):
        start, data = chunks[index]
        if start <= offset < start + len(data):
            first = index
            break
        if start + len(data) <= offset:
            return None
    if first is None:
        return None
    stop = min(limit, offset + CHUNK)
    start, data = chunks[first]
    if stop <= start + len(data):
        return memoryview(data)[offset - start : stop - start]
    pieces = []
    for start, data in itertools.islice(chunks, first, None):
        if start >= stop:
            break
        pieces.append(data[max(offset - start, 0) : stop - start])
    return b"".join(pieces)


def _pwrite_all(
    fd: int, pieces: list[bytes], offset: int, digest_update: Callable[[bytes], object] | None
) -> tuple[int, bool]:
    """Write ``pieces`` in order at ``offset``; returns (bytes written, whether the disk
    filled)."""
    if digest_update is not None:
        for piece in pieces:
            digest_update(piece)
    views = [memoryview(piece) for piece in pieces if piece]
    first, done = 0, 0
    while first < len(views):
        try:
            n = os.pwritev(fd, views[first : first + _IOV_MAX], offset + done)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            return done, True
        done += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]
    return done, False


def _split(pieces: list[bytes], n: int) -> tuple[list[bytes], list[bytes]]:
    """``pieces`` as (the first ``n`` bytes, the rest), cut inside a piece if need be."""
    kept: list[bytes] = []
    for index, piece in enumerate(pieces):
        if n < len(piece):
            if n:
                kept.append(piece[:n])
            return kept, [piece[n:], *pieces[index + 1 :]]
        kept.append(piece)
        n -= len(piece)
    return kept, []
