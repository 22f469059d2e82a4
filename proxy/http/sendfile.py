"""Blob bytes from a file to a client socket with ``os.sendfile``, off the event loop.

asyncio's own ``loop.sendfile`` runs every ``sendfile`` system call on the loop's thread,
and one call copies as much as the socket takes (megabytes on loopback): with a hundred
clients downloading at once the loop spends hundreds of milliseconds per turn copying, and
every manifest request and health probe waits that long (measured: loop lag p99 ~290 ms
with 100 clients; the storm benchmark's 200 clients: 500 ms). Here a whole send — a cached
blob, or a window of a download in progress — is one job for a small set of sender
threads, each with its own ``epoll`` over the sockets it serves: it copies what a socket
takes (non-blocking ``sendfile``, at most ``PIECE`` per call), waits for the socket to
drain, and tells the loop only when the job is done (and every ``REPORT_EVERY`` bytes, for
the metrics). The loop does no work per piece: a job per socket-full cost it a writer
registration, a thread hand-off and three futures (16 clients of a 256 MiB blob: ~0.3 s of
the loop's CPU, as much as the sender threads' copying itself).

A client that takes no byte for ``timeout`` seconds is given up on (``TimeoutError``) —
the same rule as the streaming path's writes, so a stalled client costs neither a thread
nor the descriptor for long.

Descriptors: the transport may close its socket (client gone) while a job runs, and a
descriptor number is reused at once by the next ``open``/``accept``. So every job owns
duplicates of the socket and the file, which its sender thread closes: whatever the caller
does meanwhile (cancelled, closing the file), the job can only ever write to *this* client,
from *this* file. A cancelled send tells its thread, which drops the job before its next
call.

Plain TCP only: TLS must encrypt in user space (``supports``); the caller uses asyncio's
``loop.sendfile`` fallback there.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

PIECE = 4 << 20  # bytes at most per system call: a socket takes less at once anyway
# Measured on 2 cores: 2 threads; 4 competed with the loop for CPU (lag p99 36 ms vs 17 ms).
# A bigger node gets one per two cores, at most 8 (a thread moves ~2 GB/s on loopback).
WORKERS = min(8, max(2, (os.cpu_count() or 2) // 2))
NICE = 10  # the sender threads' nice value (the loop's thread stays at the process's)
REPORT_EVERY = 32 << 20  # bytes sent between progress reports to the loop (metrics)


@dataclass(eq=False, slots=True)
class _Job:
    """One send: owned duplicates of the socket and the file, the range left, and how to
    tell the loop. Fields after ``on_sent`` belong to the sender thread."""

    sock: int
    fd: int
    offset: int
    end: int
    timeout: float
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]
    on_sent: Callable[[int], None]
    deadline: float = 0.0
    unreported: int = 0
    cancelled: bool = False  # set by the loop, seen by the thread at its next turn
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        os.close(self.sock)
        os.close(self.fd)


class FileSender:
    """``os.sendfile`` from files to client sockets in sender threads (one set per app)."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._workers = [_Worker(f"pullgate-sendfile-{n}") for n in range(workers)]
        self._load = dict.fromkeys(self._workers, 0)  # jobs given to each (the loop's count)
        for worker in self._workers:
            worker.start()

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
        socket after what the transport has buffered. ``on_sent`` hears of the bytes sent
        (on the loop, in parts of ``REPORT_EVERY`` and at the end). Raises TimeoutError
        (the client took nothing for ``timeout``), ConnectionError (it went away) or
        EOFError (the file ended before ``offset + count``)."""
        loop = asyncio.get_running_loop()
        await _flush(loop, transport, timeout)
        if count <= 0:
            return
        own_sock, own_fd = _duplicates(transport, fd)
        job = _Job(own_sock, own_fd, offset, offset + count, timeout, loop, loop.create_future(), on_sent)
        worker = min(self._workers, key=self._load.__getitem__)
        try:
            worker.submit(job)
        except BaseException:
            job.close()
            raise
        self._load[worker] += 1
        job.done.add_done_callback(lambda _: self._finished(worker))
        try:
            await job.done
        except asyncio.CancelledError:
            worker.cancel(job)
            raise

    def _finished(self, worker: _Worker) -> None:
        self._load[worker] -= 1

    async def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        await asyncio.to_thread(_join, self._workers)


def _duplicates(transport: asyncio.WriteTransport, fd: int) -> tuple[int, int]:
    """A job's own descriptors: duplicates of the client's socket and of the file."""
    if transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    own_sock = os.dup(transport.get_extra_info("socket").fileno())
    try:
        return own_sock, os.dup(fd)
    except BaseException:
        os.close(own_sock)
        raise


def _join(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.join()
        worker.release()


async def _flush(loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport, timeout: float) -> None:
    """Wait until the bytes the transport holds (headers, a piece written from memory) are
    on the socket: the file's bytes go after them. (A duplicate is watched: asyncio refuses
    a writer on a descriptor its transport owns.)"""
    if not transport.get_write_buffer_size():
        return
    if transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    watched = os.dup(transport.get_extra_info("socket").fileno())
    try:
        while transport.get_write_buffer_size():
            await _writable(loop, transport, watched, timeout)
    finally:
        os.close(watched)


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


class _Worker(threading.Thread):
    """A sender thread: its jobs' sockets in one ``epoll`` (level-triggered: a socket
    reported writable takes one call, then the others get their turn), an ``eventfd`` the
    loop rings for new and cancelled jobs, and each job's deadline (no byte taken for its
    timeout)."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._poll = select.epoll()
        self._bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll.register(self._bell, select.EPOLLIN)
        self._inbox: deque[_Job] = deque()  # appended by the loop, taken by the thread
        self._door = threading.Lock()  # no job comes in once the thread has stopped
        self._jobs: dict[int, _Job] = {}  # by socket duplicate
        self._earliest = math.inf  # no deadline before this (a lower bound)
        self._stopping = False

    # --- the loop's side ---------------------------------------------------------------
    def submit(self, job: _Job) -> None:
        if not self._ring(job):  # stopped, or died of a bug: the job would wait forever
            raise ConnectionResetError("the sender has stopped")

    def cancel(self, job: _Job) -> None:
        job.cancelled = True
        self._ring(job)  # (a stopped thread has finished every job it had)

    def stop(self) -> None:
        with self._door:
            self._stopping = True
            os.eventfd_write(self._bell, 1)

    def release(self) -> None:
        """Close the bell, once the thread has ended (never while the loop may ring it:
        its number could be reused by a client's socket)."""
        os.close(self._bell)

    def _ring(self, job: _Job) -> bool:
        with self._door:
            if self._stopping:
                return False
            self._inbox.append(job)
            os.eventfd_write(self._bell, 1)
            return True

    # --- the thread --------------------------------------------------------------------
    def run(self) -> None:
        _yield_to_the_loop()
        try:
            while not self._stopping:
                wait = None if not self._jobs else max(0.0, self._earliest - time.monotonic())
                events = self._poll.poll(wait)
                now = time.monotonic()
                for fd, _ in events:
                    if fd == self._bell:
                        self._take_inbox(now)
                    elif (job := self._jobs.get(fd)) is not None:
                        self._advance(job, now)
                if now >= self._earliest:
                    self._expire(now)
        finally:
            with self._door:
                self._stopping = True
            for job in [*self._jobs.values(), *self._inbox]:
                self._finish(job, ConnectionResetError("the sender has stopped"))
            self._poll.close()

    def _take_inbox(self, now: float) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._bell)
        while self._inbox:
            job = self._inbox.popleft()
            if job.cancelled or job.closed:
                self._finish(job, None)  # the caller is gone: nothing to tell it
                continue
            job.deadline = now + job.timeout
            self._earliest = min(self._earliest, job.deadline)
            self._jobs[job.sock] = job
            self._poll.register(job.sock, select.EPOLLOUT)
            self._advance(job, now)  # most sockets take bytes at once

    def _advance(self, job: _Job, now: float) -> None:
        """One ``sendfile`` of what the socket takes now."""
        try:
            sent = os.sendfile(job.sock, job.fd, job.offset, min(job.end - job.offset, PIECE))
        except BlockingIOError:
            return  # filled up meanwhile: wait for it
        except OSError as exc:  # EPIPE, ECONNRESET (ConnectionError) or the file's error
            self._finish(job, exc)
            return
        if sent == 0:
            self._finish(job, EOFError(f"file ended at byte {job.offset} of {job.end}"))
            return
        job.offset += sent
        job.unreported += sent
        job.deadline = now + job.timeout
        if job.offset >= job.end:
            self._finish(job, None)
        elif job.unreported >= REPORT_EVERY:
            _tell(job, _report, job, job.unreported)
            job.unreported = 0

    def _expire(self, now: float) -> None:
        self._earliest = math.inf
        for job in list(self._jobs.values()):
            if job.deadline <= now:
                self._finish(job, TimeoutError(f"the client took no byte for {job.timeout} s"))
            else:
                self._earliest = min(self._earliest, job.deadline)

    def _finish(self, job: _Job, error: BaseException | None) -> None:
        """Close what the job owns (unregistered first: epoll forgets a socket only when
        every descriptor of it is closed), then tell the loop."""
        if job.closed:
            return
        if self._jobs.get(job.sock) is job:
            del self._jobs[job.sock]
            self._poll.unregister(job.sock)
        job.close()
        _tell(job, _settle, job, error, job.unreported)


def _tell(job: _Job, callback: Callable[..., None], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        job.loop.call_soon_threadsafe(callback, *args)


def _report(job: _Job, count: int) -> None:
    if not job.done.done():
        job.on_sent(count)


def _settle(job: _Job, error: BaseException | None, count: int) -> None:
    if job.done.done():
        return  # cancelled: the caller has moved on
    if count:
        job.on_sent(count)
    if error is None:
        job.done.set_result(None)
    else:
        job.done.set_exception(error)


def _yield_to_the_loop() -> None:
    """Bulk copies run at a lower CPU priority than the event loop's thread (Linux: a
    thread's nice value is its own): when the cores are busy, a manifest request or a
    health probe is served before the next megabytes of a blob, not after."""
    with contextlib.suppress(OSError):  # raising one's own nice value is always allowed; be safe anyway
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
