"""Blob bytes from a file to a client socket with ``os.sendfile``, off the event loop.

asyncio's own ``loop.sendfile`` runs every ``sendfile`` system call on the loop's thread,
and one call copies as much as the socket takes (megabytes on loopback): with a hundred
clients downloading at once the loop spends hundreds of milliseconds per turn copying, and
every manifest request and health probe waits that long (measured: loop lag p99 ~290 ms
with 100 clients; the storm benchmark's 200 clients: 500 ms). Here the loop only waits
for a socket to become writable; the copy itself runs in a small pool of worker threads
(``os.sendfile`` releases the GIL), so the loop stays free between copies and the copies
use the other cores (100 clients, 4 MiB calls, 2 workers: p99 ~17 ms, same throughput).

Each call sends what the socket takes at once (non-blocking, at most ``PIECE``); a client
that takes no byte for ``timeout`` seconds is given up on (``TimeoutError``) — the same
rule as the streaming path's writes, so a stalled client costs neither a worker nor the
descriptor for long.

Descriptors: the transport may close its socket (client gone) while a copy runs, and a
descriptor number is reused at once by the next ``open``/``accept``. So every worker call
gets duplicates of the socket and the file that it closes itself: whatever the caller does
meanwhile (cancelled, closing the file), the call can only ever write to *this* client,
from *this* file.

Plain TCP only: TLS must encrypt in user space (``supports``); the caller uses asyncio's
``loop.sendfile`` fallback there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

PIECE = 4 << 20  # bytes at most per system call: a socket takes less at once anyway
# Measured on 2 cores: 2 workers; 4 competed with the loop for CPU (lag p99 36 ms vs 17 ms).
# A bigger node gets one per two cores, at most 8 (a worker moves ~2 GB/s on loopback).
WORKERS = min(8, max(2, (os.cpu_count() or 2) // 2))
NICE = 10  # the sender threads' nice value (the loop's thread stays at the process's)
_NOT_NOW = -1


class FileSender:
    """``os.sendfile`` from files to client sockets in worker threads (one pool per app)."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pullgate-sendfile", initializer=_yield_to_the_loop)

    @staticmethod
    def supports(transport: asyncio.BaseTransport) -> bool:
        """Whether ``send`` can serve this connection (a plain socket, no TLS)."""
        return transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None

    async def send(
        self,
        transport: asyncio.WriteTransport,
        fd: int,
        offset: int,
        count: int,
        *,
        timeout: float,
        on_sent: Callable[[int], None],
    ) -> None:
        """Send bytes ``[offset, offset + count)`` of the file ``fd`` to the transport's
        socket after what the transport has buffered. ``on_sent`` hears of every part sent.
        Raises TimeoutError (the client took nothing for ``timeout``), ConnectionError
        (it went away) or EOFError (the file ended before ``offset + count``)."""
        loop = asyncio.get_running_loop()
        watched = os.dup(transport.get_extra_info("socket").fileno())
        try:
            # Bytes the transport holds (headers, a piece written from memory) go first.
            while transport.get_write_buffer_size():
                await _writable(loop, transport, watched, timeout)
            end = offset + count
            while offset < end:
                await _writable(loop, transport, watched, timeout)
                sent = await self._submit(loop, watched, fd, offset, min(end - offset, PIECE))
                if sent == 0:
                    raise EOFError(f"file ended at byte {offset} of {end}")
                if sent > 0:
                    offset += sent
                    on_sent(sent)
        finally:
            os.close(watched)

    def _submit(
        self, loop: asyncio.AbstractEventLoop, sock: int, fd: int, offset: int, count: int
    ) -> asyncio.Future[int]:
        """One worker call on duplicates it owns: once submitted, the call closes them."""
        own_sock, own_fd = os.dup(sock), -1
        try:
            own_fd = os.dup(fd)
            return loop.run_in_executor(self._pool, _send_some, own_sock, own_fd, offset, count)
        except BaseException:
            os.close(own_sock)
            if own_fd >= 0:
                os.close(own_fd)
            raise

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown)


async def _writable(loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport, fd: int, timeout: float) -> None:
    if transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _wake, ready)
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        loop.remove_writer(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _yield_to_the_loop() -> None:
    """Bulk copies run at a lower CPU priority than the event loop's thread (Linux: a
    thread's nice value is its own): when the cores are busy, a manifest request or a
    health probe is served before the next megabytes of a blob, not after."""
    with contextlib.suppress(OSError):  # raising one's own nice value is always allowed; be safe anyway
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def _send_some(sock: int, fd: int, offset: int, count: int) -> int:
    """One non-blocking ``sendfile`` on descriptors this call owns (closes): bytes sent,
    0 at the end of the file, ``_NOT_NOW`` when the socket filled up meanwhile."""
    try:
        return os.sendfile(sock, fd, offset, count)
    except BlockingIOError:
        return _NOT_NOW
    finally:
        os.close(sock)
        os.close(fd)
