"""``FileSender`` on real loopback sockets: the exact byte range after what the transport
buffered, told to the loop once per ``REPORT_EVERY`` bytes (not per system call), many
clients at once over few threads, a stalled or vanished client ends the send (and every
descriptor it opened is closed again), a file shorter than the range is an error rather
than padding, a cancelled send never writes elsewhere and lets go of its descriptors,
stopping the sender ends the sends still running, and TLS connections are left to
asyncio's fallback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.http import sendfile
from proxy.http.sendfile import PIECE, REPORT_EVERY, FileSender
from tests.support.certs import write_cert
from tests.support.polling import eventually

DATA = os.urandom(3 * PIECE + 12345)
Connection = tuple[asyncio.WriteTransport, asyncio.StreamReader]


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    return path


@pytest.fixture
async def sender() -> AsyncIterator[FileSender]:
    made = FileSender()
    yield made
    await made.close()


@asynccontextmanager
async def connection(*, receive_buffer: int | None = None) -> AsyncIterator[Connection]:
    """A loopback connection: the server side's transport and the client's reader."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_client(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.socket()
    if receive_buffer is not None:  # before connect: the window is agreed then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, client = await asyncio.open_connection(sock=sock)
    writer = await asyncio.wait_for(accepted, 5)
    try:
        yield writer.transport, reader
    finally:
        writer.close()
        client.close()
        server.close()


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("offset", "count", "buffered"),
    [
        (0, len(DATA), b""),
        (0, len(DATA), b"HTTP/1.1 200 OK\r\n\r\n"),  # headers the transport holds go first
        (PIECE - 7, PIECE + 100, b"x" * 300_000),  # more than a socket takes at once
        (len(DATA) - 1, 1, b""),
    ],
    ids=["whole", "after-headers", "after-a-full-buffer", "last-byte"],
)
async def test_sends_exactly_the_range_after_what_the_transport_holds(
    sender: FileSender, blob: Path, offset: int, count: int, buffered: bytes
) -> None:
    async with connection() as (transport, reader):
        assert sender.supports(transport)
        sent: list[int] = []
        with blob.open("rb") as file:
            transport.write(buffered)
            receiving = asyncio.ensure_future(reader.readexactly(len(buffered) + count))
            await sender.send(transport, file.fileno(), offset, count, timeout=5, on_sent=sent.append)
            assert await asyncio.wait_for(receiving, 10) == buffered + DATA[offset : offset + count]
        assert count < REPORT_EVERY
        assert sent == [count]  # one report: the loop is not woken per system call


@pytest.mark.parametrize(("report_every", "reports"), [(1 << 20, 13), (5 << 20, 3), (64 << 20, 1)])
async def test_progress_is_told_in_parts_that_add_up(
    sender: FileSender, blob: Path, monkeypatch: pytest.MonkeyPatch, report_every: int, reports: int
) -> None:
    """Long sends report what went out now and then (the served-bytes metric moves while a
    slow client downloads), at least ``REPORT_EVERY`` bytes a time, and the parts add up."""
    monkeypatch.setattr(sendfile, "REPORT_EVERY", report_every)
    async with connection() as (transport, reader):
        sent: list[int] = []
        with blob.open("rb") as file:
            receiving = asyncio.ensure_future(reader.readexactly(len(DATA)))
            await sender.send(transport, file.fileno(), 0, len(DATA), timeout=5, on_sent=sent.append)
            assert await asyncio.wait_for(receiving, 10) == DATA
    assert sum(sent) == len(DATA)
    assert 1 <= len(sent) <= reports
    assert all(part >= report_every for part in sent[:-1])


async def test_many_clients_at_once_each_get_their_own_range(sender: FileSender, blob: Path) -> None:
    """Twenty sends share the sender threads, each socket served as it drains."""
    ranges = [(n * 100_003 % len(DATA), len(DATA) - n * 100_003 % len(DATA)) for n in range(20)]
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(connection()) for _ in ranges]
        file = stack.enter_context(blob.open("rb"))
        receiving = [reader.readexactly(count) for (_, reader), (_, count) in zip(connections, ranges, strict=True)]
        sending = [
            sender.send(transport, file.fileno(), offset, count, timeout=5, on_sent=lambda _: None)
            for (transport, _), (offset, count) in zip(connections, ranges, strict=True)
        ]
        results = await asyncio.wait_for(asyncio.gather(*receiving, *sending), 30)
    for got, (offset, count) in zip(results, ranges, strict=False):
        assert got == DATA[offset : offset + count]


async def _stall(transport: asyncio.WriteTransport, reader: asyncio.StreamReader) -> None:
    """The client reads nothing."""


async def _vanish(transport: asyncio.WriteTransport, reader: asyncio.StreamReader) -> None:
    """The client reads a little and resets its connection."""
    await reader.readexactly(1000)
    sock = reader._transport.get_extra_info("socket")  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    reader._transport.close()  # type: ignore[attr-defined]


async def _short_file(transport: asyncio.WriteTransport, reader: asyncio.StreamReader) -> None:
    """The client reads all the file has (the file is what falls short)."""
    await reader.readexactly(len(DATA))


@pytest.mark.parametrize(
    ("client", "count", "error"),
    [
        (_stall, len(DATA), TimeoutError),
        (_vanish, len(DATA), ConnectionError),
        (_short_file, len(DATA) + 1, EOFError),
    ],
    ids=["stalled", "vanished", "short-file"],
)
async def test_a_send_that_cannot_finish_raises_and_closes_what_it_opened(
    sender: FileSender,
    blob: Path,
    client: Callable[[asyncio.WriteTransport, asyncio.StreamReader], Awaitable[None]],
    count: int,
    error: type[Exception],
) -> None:
    async with connection(receive_buffer=64 << 10) as (transport, reader):
        before = open_descriptors()
        behaviour = asyncio.ensure_future(client(transport, reader))
        with blob.open("rb") as file, pytest.raises(error):
            await sender.send(transport, file.fileno(), 0, count, timeout=0.5, on_sent=lambda _: None)
        await behaviour
        # The workers' duplicates are closed by the workers, the watched one by the send.
        await asyncio.sleep(0.1)
        assert open_descriptors() - before == set()  # (the vanished client's sockets are gone too)


async def test_a_cancelled_send_writes_nothing_after_its_descriptors_are_reused(
    sender: FileSender, blob: Path, tmp_path: Path
) -> None:
    """Cancelled mid-send, then the file closed and a new file opened (its descriptor number
    may be the old one's): the worker's call can only have used its own duplicates."""
    async with connection(receive_buffer=64 << 10) as (transport, reader):
        file = blob.open("rb")
        sending = asyncio.ensure_future(
            sender.send(transport, file.fileno(), 0, len(DATA), timeout=5, on_sent=lambda _: None)
        )
        first = await reader.readexactly(100_000)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        file.close()
        other = tmp_path / "other"
        other.write_bytes(b"\0" * len(DATA))
        with other.open("rb"):
            transport.close()
            rest = await asyncio.wait_for(reader.read(), 10)
        assert first + rest == DATA[: len(first) + len(rest)]


async def test_a_cancelled_send_lets_go_of_its_descriptors(sender: FileSender, blob: Path) -> None:
    async with connection(receive_buffer=64 << 10) as (transport, reader):
        with blob.open("rb") as file:
            before = open_descriptors()
            sending = asyncio.ensure_future(
                sender.send(transport, file.fileno(), 0, len(DATA), timeout=60, on_sent=lambda _: None)
            )
            await reader.readexactly(1000)  # under way, and the client reads no more
            assert len(open_descriptors() - before) == 2  # the thread's duplicates
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            await eventually(lambda: open_descriptors() - before == set(), timeout=2)


async def test_stopping_the_sender_ends_the_sends_still_running(blob: Path) -> None:
    sender = FileSender()
    async with connection(receive_buffer=64 << 10) as (transport, _):
        before = open_descriptors()
        with blob.open("rb") as file:
            sending = asyncio.ensure_future(
                sender.send(transport, file.fileno(), 0, len(DATA), timeout=60, on_sent=lambda _: None)
            )
            await asyncio.sleep(0.2)  # the client reads nothing: the send waits for it
            await asyncio.wait_for(sender.close(), 5)
            with pytest.raises(ConnectionResetError):
                await sending
            with pytest.raises(ConnectionResetError):  # and no send starts any more
                await sender.send(transport, file.fileno(), 0, 10, timeout=1, on_sent=lambda _: None)
        assert open_descriptors() - before == set()


async def test_tls_connections_are_not_for_sendfile(sender: FileSender, tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, 1)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_client(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    _, client = await asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="localhost")
    writer = await asyncio.wait_for(accepted, 5)
    try:
        assert not sender.supports(writer.transport)
    finally:
        writer.close()
        client.close()
        server.close()
