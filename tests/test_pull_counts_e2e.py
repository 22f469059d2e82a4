"""Issue 15, item 12: what ``pullgate cache ls`` says about pulls, as an SRE sees it.

A real daemon in front of the real registry, containerd pulling through it, and the CLI
(``python -m proxy cache ls``) reading the daemon's cache while it runs:

- two ``ctr pull``s are two pulls (containerd resolves the tag with a HEAD and then GETs the
  manifest by digest: only GETs count), and an extra HEAD changes nothing;
- the count shows up promptly (the daemon batches its writes for about a second);
- an image imported and never pulled shows ``never``, not the time it was imported.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import skopeo
from tests.support.containerd import Containerd
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory
from tests.support.procs import arun
from tests.support.registry import Registry

VISIBLE_WITHIN = 5.0  # seconds: the daemon's one-second batching plus a CLI start or two


async def pullgate(config: Path, *args: str) -> str:
    done = await arun([sys.executable, "-m", "proxy", *args, "--config", str(config)], timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def listed(config: Path) -> dict[str, dict[str, Any]]:
    return {i["reference"]: i for i in json.loads(await pullgate(config, "cache", "ls", "--json"))}


async def test_cache_ls_counts_each_pull_once_promptly_and_never_for_imports(
    registry: Registry, containerd: Containerd, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    pulled = image_factory.index("1", layers=[30_000])
    await registry.apush(pulled.layout, "1", f"{repo}:1")
    imported = image_factory.image("2", layers=[20_000])
    archive = tmp_path / "imported.tar"
    await skopeo.acopy(f"oci:{imported.layout}:2", f"oci-archive:{archive}:docker.io/{repo}-imported:2")
    with Daemon(tmp_path / "daemon", registry.url) as daemon:
        config = daemon.config  # the CLI works on the running daemon's cache
        await pullgate(config, "import", str(archive))
        ref = f"docker.io/{repo}:1"
        for _ in range(2):
            digest = await containerd.apull(ref, daemon.url(""), namespace=containerd.new_namespace())
            assert digest == pulled.index_digest
        pulled_at = time.monotonic()
        async with (  # a HEAD is a resolve, not a pull
            aiohttp.ClientSession() as session,
            session.head(daemon.url(f"/v2/{repo}/manifests/1")) as response,
        ):
            assert response.status == 200

        seen: dict[str, Any] = {}
        while time.monotonic() - pulled_at < VISIBLE_WITHIN:
            seen = (await listed(config)).get(ref, {})
            if seen.get("pull_count"):
                break
            await asyncio.sleep(0.2)
        print(f"\npull count visible {time.monotonic() - pulled_at:.2f}s after the pull")
        assert seen.get("pull_count") == 2, seen
        assert seen["last_pulled"] is not None
        await asyncio.sleep(1.5)  # nothing else arrives later (the HEAD)
        images = await listed(config)
        assert images[ref]["pull_count"] == 2
        never = images[f"docker.io/{repo}-imported:2"]
        assert (never["pull_count"], never["last_pulled"]) == (0, None)
        table = await pullgate(config, "cache", "ls")
    header, *rows = table.splitlines()
    column = header.index("LAST PULLED")
    (row,) = [r for r in rows if f"{repo}-imported" in r]
    assert row[column:].split()[0] == "never", table
    (row,) = [r for r in rows if r.split()[1] == repo]
    assert row.split()[-1] == "2", table
