"""Noticing changed files (policies, TLS certificates, htpasswd and token files) and
running a watcher for as long as a context lasts.

Files are compared by (mtime, size, inode): cert-manager and ConfigMap updates replace
files through a symlink swap, which changes the inode even when mtime and size do not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

Stamp = tuple[int, int, int]
MISSING: Stamp = (0, 0, 0)


def stamp(path: Path) -> Stamp:
    """What changes when ``path`` is rewritten, replaced or removed."""
    try:
        st = path.stat()
    except OSError:
        return MISSING
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def stamps(*paths: Path) -> tuple[Stamp, ...]:
    return tuple(stamp(p) for p in paths)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run ``coro`` as a task until the context exits, then cancel it and wait."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
