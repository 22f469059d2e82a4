"""Noticing changed files (policies, TLS certificates, htpasswd and token files); the
watchers themselves run under ``proxy.ops.supervisor``.

Files are compared by (mtime, size, inode): cert-manager and ConfigMap updates replace
files through a symlink swap, which changes the inode even when mtime and size do not.
"""

from __future__ import annotations

from pathlib import Path

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
