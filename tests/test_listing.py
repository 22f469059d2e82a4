"""What the cache tools print: ``ls``, ``du`` and ``prune`` tables and relative times."""

from __future__ import annotations

import time

import pytest

from proxy.inventory.images import Image, PrunePlan
from proxy.inventory.listing import _ago, du_lines, ls_lines, prune_lines

NOW = 1_800_000_000.0


def image(tags: tuple[str, ...] = ("1",), missing: tuple[str, ...] = (), complete: bool = True) -> Image:
    return Image(
        registry="docker.io",
        upstream="docker.io",
        repository="library/app",
        digest="sha256:" + "ab" * 32,
        media_type="application/vnd.oci.image.index.v1+json",
        tags=tags,
        platforms=("linux/amd64", "linux/arm64"),
        missing_platforms=missing,
        size=3 << 20,
        complete=complete,
        last_pulled=time.time() - 7200,
        pull_count=4,
    )


@pytest.mark.parametrize(
    ("listed", "row"),
    [
        (image(), "docker.io  library/app  1     abababababab  linux/amd64,linux/arm64  3.0 MiB  2 hours ago  4"),
        (image(("1", "latest")), "1,latest"),
        (image(()), "<none>"),
        (image(missing=("linux/arm64",), complete=False), "linux/amd64 (+1 not cached)  3.0 MiB (partial)"),
    ],
)
def test_ls_lines(listed: Image, row: str) -> None:
    header, line = list(ls_lines([listed]))
    assert header.split() == [
        "UPSTREAM",
        "REPOSITORY",
        "TAGS",
        "DIGEST",
        "PLATFORMS",
        "SIZE",
        "LAST",
        "PULLED",
        "PULLS",
    ]
    assert row in line


def test_du_lines_show_savings_and_quota() -> None:
    usage = {
        "repositories": [
            {"upstream": "docker.io", "repository": "library/a", "images": 2, "size": 3 << 20, "logical": 4 << 20}
        ],
        "stored": 3 << 20,
        "logical": 4 << 20,
        "savings": 1 << 20,
        "unreferenced": 0,
        "on_disk": 3 << 20,
        "objects": 7,
        "max_size": 30 << 20,
    }
    lines = list(du_lines(usage))
    assert lines[1].split() == ["docker.io", "library/a", "2", "3.0", "MiB", "4.0", "MiB"]
    assert "layer sharing saves 1.0 MiB (25.0%)" in lines[3]
    assert lines[-1] == "on disk: 3.0 MiB in 7 objects, 10.0% of cache.max_size 30.0 MiB"


@pytest.mark.parametrize(("dry_run", "verb"), [(True, "would remove"), (False, "removed")])
def test_prune_lines(dry_run: bool, verb: str) -> None:
    plan = PrunePlan((image(),), (), ("sha256:" + "cd" * 32,), 1024)
    lines = list(prune_lines(plan, 1024, dry_run))
    assert lines[0].startswith(f"{verb} docker.io/library/app:1  sha256:abab")
    assert lines[1] == f"{verb} 1 objects, 1.0 KiB" + (" (dry run)" if dry_run else "")


@pytest.mark.parametrize(
    ("age", "text"),
    [(5, "just now"), (60, "1 minute ago"), (7200, "2 hours ago"), (3 * 86400 + 5, "3 days ago"), (None, "never")],
)
def test_ago(age: float | None, text: str) -> None:
    assert _ago(NOW - age if age is not None else 0, NOW) == text
