"""The blob store on a real directory: atomic commits, reads and removals (in worker threads
for the daemon, blocking for the CLI tools), the startup sweep of stray temp files, scans."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.registry.store import BlobStore


@pytest.fixture
async def store(tmp_path: Path) -> BlobStore:
    opened = BlobStore(tmp_path / "cache")
    await opened.open()
    return opened


@pytest.fixture
def dead_pid() -> Iterator[int]:
    """The PID of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    yield int(done.stdout)


@pytest.mark.parametrize("size", [0, 1, 1 << 20])
async def test_put_read_size_remove(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    digest = Digest.of(data)
    assert (store.size(digest), await store.read(digest), store.read_blocking(digest)) == (None, None, None)
    final = await store.put(data, digest)
    assert final == store.path(digest) == store.blobs / "sha256" / digest.hex[:2] / digest.hex
    assert (store.size(digest), await store.read(digest), store.read_blocking(digest)) == (size, data, data)
    assert list(store.tmp.iterdir()) == [], "no temp file left behind"
    assert await store.remove(digest) == size
    assert (store.size(digest), await store.remove(digest), store.remove_blocking(digest)) == (None, 0, 0)


async def test_commit_moves_a_written_temp_file_into_place(store: BlobStore) -> None:
    data = b"streamed"
    temp = store.temp_path()
    assert temp.parent == store.tmp and temp.name.startswith(f"{os.getpid()}-")
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, data)
        final = await store.commit(temp, Digest.of(data), fd)
    finally:
        os.close(fd)
    assert final.read_bytes() == data and not temp.exists()


@pytest.mark.parametrize(
    ("writer", "swept"),
    [
        ("dead", True),  # its writer crashed: nobody will finish it
        ("init", False),  # PID 1 is alive: another process (a CLI `warm`) may still be writing
        ("self", True),  # ours, from before this open: nothing of ours is in flight yet
        ("junk", True),  # not a name a writer uses: nobody owns it
    ],
)
async def test_open_sweeps_only_temp_files_whose_writer_is_gone(
    tmp_path: Path, dead_pid: int, writer: str, swept: bool
) -> None:
    first = BlobStore(tmp_path / "cache")
    await first.open()
    names = {"dead": f"{dead_pid}-x.part", "init": "1-x.part", "self": f"{os.getpid()}-x.part", "junk": "x.part"}
    stray = first.tmp / names[writer]
    stray.write_bytes(b"half")
    await BlobStore(tmp_path / "cache").open()
    assert stray.exists() != swept


async def test_scan_lists_every_stored_blob(store: BlobStore) -> None:
    blobs = [os.urandom(n) for n in (3, 30, 300)]
    for data in blobs:
        await store.put(data, Digest.of(data))
    assert sorted(await store.scan(), key=str) == sorted(((Digest.of(d), len(d)) for d in blobs), key=str)


@pytest.mark.parametrize(("damage", "writable"), [(None, True), ("tmp-is-a-file", False), ("tmp-gone", False)])
async def test_writable(store: BlobStore, damage: str | None, writable: bool) -> None:
    if damage is not None:
        store.tmp.rmdir()
        if damage == "tmp-is-a-file":
            store.tmp.write_bytes(b"")
    assert store.writable() is writable
