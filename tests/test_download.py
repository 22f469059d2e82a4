"""One shared download (``Flight``) on a real temp file: readers at their own offsets stream
bytes as they are written, never the last byte before the digest is verified; a failure ends
every reader; a reader that comes late reads the committed file; a full disk (``/dev/full``,
the kernel's ENOSPC) turns the download into a pass-through from memory."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.errors import DigestMismatch, PullgateError, UpstreamUnavailable
from proxy.oci.digest import Digest
from proxy.registry import download
from proxy.registry.download import CHUNK, RECENT, FileWindow, Flight, State, _split
from tests.support.polling import eventually

DATA = os.urandom(3 * CHUNK + 1234)


@pytest.fixture
async def flight(tmp_path: Path) -> AsyncIterator[Flight]:
    started = Flight(Digest.of(DATA), tmp_path / "blob.part")
    await started.create()
    started.begin(len(DATA))
    yield started
    if started.fd >= 0:
        started.writer_closed()


async def collect(flight: Flight, got: bytearray, start: int = 0, end: int | None = None) -> bytes:
    async for chunk in flight.read(start, end):
        got += chunk
    return bytes(got)


@pytest.mark.parametrize(("start", "end"), [(0, None), (1000, None), (5, 17), (0, len(DATA)), (len(DATA) - 1, None)])
async def test_readers_stream_their_range_and_wait_for_verification_for_the_last_byte(
    flight: Flight, start: int, end: int | None
) -> None:
    got = bytearray()
    reader = asyncio.create_task(collect(flight, got, start, end))
    for offset in range(0, len(DATA), 5000):
        await flight.write(DATA[offset : offset + 5000])
    expected = DATA[start:end]
    if end is None or end == len(DATA):
        # Everything is written but not verified: all but the blob's last byte.
        await eventually(lambda: len(got) == len(expected) - 1)
        await asyncio.sleep(0.05)
        assert not reader.done() and len(got) == len(expected) - 1
    flight.finish()
    assert await asyncio.wait_for(reader, 5) == expected


@pytest.mark.parametrize("error", [DigestMismatch("bytes do not match"), UpstreamUnavailable("upstream went away")])
async def test_a_failed_download_ends_every_reader_with_its_error(flight: Flight, error: PullgateError) -> None:
    readers = [asyncio.create_task(collect(flight, bytearray(), start)) for start in (0, 100)]
    await flight.write(DATA[:CHUNK])
    flight.fail(error)
    for reader in readers:
        with pytest.raises(type(error)) as raised:
            await asyncio.wait_for(reader, 5)
        assert raised.value is error
    assert flight.state is State.FAILED


async def test_a_late_reader_reads_the_committed_file(flight: Flight, tmp_path: Path) -> None:
    await flight.write(DATA)
    final = tmp_path / "final"
    final.write_bytes(DATA)
    flight.final = final
    flight.finish()
    flight.writer_closed()
    assert flight.fd == -1, "nobody reads: the temp descriptor is closed"
    assert await collect(flight, bytearray(), 10) == DATA[10:]


async def test_the_descriptor_stays_open_until_the_last_reader_leaves(flight: Flight) -> None:
    got = bytearray()
    reader = asyncio.create_task(collect(flight, got))
    await flight.write(DATA[:100])
    await eventually(lambda: len(got) == 99)
    flight.writer_closed()  # the writer is done (it will not finish): the reader still holds the file
    assert flight.fd >= 0
    flight.fail(UpstreamUnavailable("cancelled"))
    with pytest.raises(UpstreamUnavailable):
        await reader
    assert flight.fd == -1


async def test_a_full_disk_passes_the_bytes_through_memory(flight: Flight) -> None:
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, flight.fd)  # every write to the temp file now fails with ENOSPC
    finally:
        os.close(full)
    got = bytearray()
    reader = asyncio.create_task(collect(flight, got))
    for offset in range(0, len(DATA), CHUNK):
        await flight.write(DATA[offset : offset + CHUNK])
    assert (flight.spilled, flight.disk_bytes, flight.written) == (True, 0, len(DATA))
    flight.finish()
    assert await asyncio.wait_for(reader, 5) == DATA


@pytest.mark.parametrize(("reader", "from_memory"), [("keeping up", True), ("late", False)])
async def test_readers_keeping_up_take_their_bytes_from_memory(tmp_path: Path, reader: str, from_memory: bool) -> None:
    data = os.urandom(RECENT + 3 * CHUNK)
    flight = Flight(Digest.of(data), tmp_path / "blob.part")
    await flight.create()
    flight.begin(len(data))
    got = bytearray()
    early = asyncio.create_task(collect(flight, got)) if reader == "keeping up" else None
    for offset in range(0, len(data), CHUNK):
        await flight.write(data[offset : offset + CHUNK])
    unreadable = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(unreadable, flight.fd)  # from here on, any read of the file fails (EBADF)
    finally:
        os.close(unreadable)
    flight.finish()
    if early is not None:
        assert await early == data
    else:
        with pytest.raises(OSError):
            await collect(flight, bytearray())
    flight.writer_closed()


async def test_a_reader_asking_for_windows_gets_the_file_and_the_last_byte_after_verification(
    flight: Flight,
) -> None:
    """A windows reader is given ranges of the file itself — up to the last byte, which
    waits for the digest."""
    for offset in range(0, len(DATA), CHUNK):
        await flight.write(DATA[offset : offset + CHUNK])
    pieces = flight.read(0, len(DATA), windows=True)
    first = await anext(pieces)
    assert isinstance(first, FileWindow) and (first.offset, first.count) == (0, len(DATA) - 1)
    assert os.pread(first.fd, first.count, first.offset) == DATA[:-1]
    last = asyncio.ensure_future(anext(pieces))
    await asyncio.sleep(0.05)
    assert not last.done(), "the last byte waits for verification"
    flight.verified()
    window = await asyncio.wait_for(last, 5)
    assert isinstance(window, FileWindow) and os.pread(window.fd, window.count, window.offset) == DATA[-1:]
    await pieces.aclose()


@pytest.mark.parametrize(("attached", "from_memory"), [("bytes", True), ("windows", False)])
async def test_only_readers_of_bytes_keep_the_download_in_memory(
    tmp_path: Path, attached: str, from_memory: bool
) -> None:
    """A reader that stays near the start keeps what it still needs in memory — unless it
    reads windows (it takes the file, so memory need not wait for it): a reader of bytes
    starting at 0 afterwards is then served from disk."""
    flight = Flight(Digest.of(DATA), tmp_path / "blob.part")
    await flight.create()
    flight.begin(len(DATA))
    idle = flight.read(0, len(DATA), windows=attached == "windows")
    # Attaches the reader at offset 0; it takes one piece at most and then stays there.
    registered = asyncio.ensure_future(anext(idle))
    await asyncio.sleep(0)
    for offset in range(0, len(DATA), CHUNK):
        await flight.write(DATA[offset : offset + CHUNK])
    unreadable = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(unreadable, flight.fd)  # from here on, any read of the file fails
    finally:
        os.close(unreadable)
    flight.finish()
    if from_memory:
        assert await asyncio.wait_for(collect(flight, bytearray()), 5) == DATA
    else:
        with pytest.raises(OSError):
            await collect(flight, bytearray())
    registered.cancel()
    await asyncio.gather(registered, return_exceptions=True)
    await idle.aclose()
    flight.writer_closed()


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in pieces of ``sizes`` (the last piece takes the rest)."""
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size
    return [*pieces, data[at:]]


@pytest.mark.parametrize(
    "sizes",
    [[], [1], [CHUNK, 0, 5], [0, 0], [7] * 40, [CHUNK * 2, 1, CHUNK]],
    ids=["whole", "one-byte-first", "an-empty-piece", "empty-first", "many-small", "uneven"],
)
async def test_pieces_are_written_in_order_and_read_back_alike(flight: Flight, sizes: list[int]) -> None:
    """The download hands over what arrived as pieces (no join on the event loop): the
    file, the hash and every reader (from memory, from disk, by windows) see them in order."""
    hashed = bytearray()
    memory, windows = bytearray(), bytearray()
    from_memory = asyncio.create_task(collect(flight, memory))
    by_windows = asyncio.create_task(_windows(flight, windows))
    await flight.write(_cut(DATA, sizes), hashed.extend)
    flight.verified()
    assert bytes(hashed) == DATA and flight.written == len(DATA)
    assert os.pread(flight.fd, len(DATA) + 1, 0) == DATA
    assert await asyncio.wait_for(from_memory, 5) == DATA
    assert await asyncio.wait_for(by_windows, 5) == DATA
    assert await collect(flight, bytearray(), 1000) == DATA[1000:]  # a late reader, from disk


async def _windows(flight: Flight, got: bytearray) -> bytes:
    async for window in flight.read(0, len(DATA), windows=True):
        assert isinstance(window, FileWindow)
        got += os.pread(window.fd, window.count, window.offset)
    return bytes(got)


_PARTIAL_WRITE = """
import os, resource, signal, sys
from proxy.registry.download import _pwrite_all
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
limit, path = int(sys.argv[1]), sys.argv[2]
pieces = [bytes([n]) * size for n, size in enumerate([100, 0, 300, 50, 1000])]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
hashed = []
print(*_pwrite_all(fd, pieces, 0, hashed.append), sum(map(len, hashed)))
"""


@pytest.mark.parametrize(
    ("limit", "written", "filled"),
    [(10_000, 1450, False), (1450, 1450, False), (400, 400, True), (250, 250, True), (100, 100, True), (0, 0, True)],
)
def test_a_disk_that_fills_midway_through_the_pieces_says_where(
    tmp_path: Path, limit: int, written: int, filled: bool
) -> None:
    """A file size limit (EFBIG, a real short write from the kernel) inside a piece, at a
    piece's edge, before the first: the bytes written and the disk-full flag are exact, and
    every piece was hashed first (the download goes on in memory from there)."""
    path = tmp_path / "blob.part"
    done = subprocess.run(
        [sys.executable, "-c", _PARTIAL_WRITE, str(limit), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.stdout.split() == [str(written), str(filled), "1450"]
    expected = b"".join(bytes([n]) * size for n, size in enumerate([100, 0, 300, 50, 1000]))[:written]
    assert path.read_bytes() == expected


@pytest.mark.parametrize(
    ("n", "kept", "rest"),
    [
        (0, [], [b"abc", b"", b"de"]),
        (2, [b"ab"], [b"c", b"", b"de"]),
        (3, [b"abc", b""], [b"de"]),
        (4, [b"abc", b"", b"d"], [b"e"]),
        (5, [b"abc", b"", b"de"], []),
    ],
)
def test_split_cuts_the_pieces_at_the_bytes_written(n: int, kept: list[bytes], rest: list[bytes]) -> None:
    assert _split([b"abc", b"", b"de"], n) == (kept, rest)


async def test_a_disk_that_fills_inside_the_pieces_keeps_the_rest_in_memory(tmp_path: Path) -> None:
    """The bytes past a full disk go to the readers from memory, in order."""
    flight = Flight(Digest.of(DATA), tmp_path / "blob.part")
    await flight.create()
    flight.begin(len(DATA))
    got = bytearray()
    reader = asyncio.create_task(collect(flight, got))
    await flight.write(_cut(DATA[: CHUNK + 10], [CHUNK]))  # on disk
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, flight.fd)
    finally:
        os.close(full)
    await flight.write(_cut(DATA[CHUNK + 10 :], [5, 0, CHUNK]))
    assert (flight.spilled, flight.disk_bytes, flight.written) == (True, CHUNK + 10, len(DATA))
    flight.finish()
    assert await asyncio.wait_for(reader, 5) == DATA


@pytest.fixture
def edge(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, float], None]:
    def set_edge(window: int, wait: float) -> None:
        monkeypatch.setattr(download, "EDGE_WINDOW", window)
        monkeypatch.setattr(download, "EDGE_WAIT", wait)

    return set_edge


async def test_a_reader_of_windows_at_the_edge_waits_for_a_whole_window(
    tmp_path: Path, edge: Callable[[int, float], None]
) -> None:
    """Keeping up with the download, a reader of windows is sent ``EDGE_WINDOW`` bytes at a
    time, not each write as it lands; the rest once verified."""
    edge(2 * CHUNK, 60.0)
    data = os.urandom(8 * CHUNK)
    flight = Flight(Digest.of(data), tmp_path / "blob.part")
    await flight.create()
    flight.begin(len(data))
    sizes: list[tuple[int, bool]] = []

    async def read() -> None:
        async for window in flight.read(0, len(data), windows=True):
            assert isinstance(window, FileWindow)
            at, count = window.offset, window.count
            assert os.pread(window.fd, count, at) == data[at : at + count]
            sizes.append((count, flight.state is State.RUNNING))

    reader = asyncio.create_task(read())
    for offset in range(0, len(data), CHUNK // 4):
        await flight.write(data[offset : offset + CHUNK // 4])
        await asyncio.sleep(0)
    flight.verified()
    await asyncio.wait_for(reader, 5)
    flight.finish()
    flight.writer_closed()
    assert sum(size for size, _ in sizes) == len(data)
    before_verified = [size for size, _ in sizes[:-1]]
    assert before_verified and all(size >= 2 * CHUNK for size in before_verified), sizes


@pytest.mark.parametrize(
    ("windows", "end", "edge_wait", "held"),
    [
        (True, None, 0.05, True),  # held back, but only for EDGE_WAIT: a slow download still flows
        (True, CHUNK // 2, 30.0, False),  # the range's end is written: nothing more to wait for
        (False, None, 30.0, False),  # readers of bytes (TLS) take each write as it lands
    ],
)
async def test_what_a_reader_at_the_edge_is_given_at_once(
    flight: Flight, edge: Callable[[int, float], None], windows: bool, end: int | None, edge_wait: float, held: bool
) -> None:
    """Less than a window written and more to come: held for ``EDGE_WAIT`` at most (30 s
    here where it must not apply: the read would time out)."""
    edge(1 << 30, edge_wait)
    pieces = flight.read(0, end, windows=windows)
    first = asyncio.ensure_future(anext(pieces))
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await flight.write(DATA[:CHUNK])
    got = await asyncio.wait_for(first, 5)
    if held:
        assert asyncio.get_running_loop().time() - started >= 0.04
    count = got.count if isinstance(got, FileWindow) else len(got)
    assert 0 < count <= (end or CHUNK - 1)
    await pieces.aclose()
