"""The benchmark runs end to end (``bench/bench_mirror.py --quick``: small blobs, 1 s wrk
runs, ~15 s): it prints its table, and the 16 concurrent cold GETs through pullgate reached
the upstream exactly once (request coalescing) with every client getting the whole blob."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp import web

from tests.support.aio import ServerFactory
from tests.support.procs import run

ROOT = Path(__file__).resolve().parent.parent


def _load_nodes() -> ModuleType:
    """bench/nodes.py by its path: bench/ is scripts, not a package, and putting it on
    sys.path would let its module names shadow others for the whole test session."""
    spec = importlib.util.spec_from_file_location("pullgate_bench_nodes", ROOT / "bench" / "nodes.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


nodes = _load_nodes()


@pytest.mark.e2e
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run([sys.executable, str(ROOT / "bench" / "bench_mirror.py"), "--quick", "--out", str(out)], timeout=120)
    assert "| measurement | pullgate | reference (Distribution proxy) |" in done.stdout
    assert "warm manifest by tag" in done.stdout
    result = json.loads(out.read_text())
    concurrent = result["concurrent"]["pullgate"]
    assert concurrent["upstream_blob_gets"] == 1
    assert concurrent["ok"] == concurrent["clients"] == 16
    assert result["warm"]["manifest"]["pullgate"]["tag"]["errors"] == 0
    # The limits measured beside pullgate answered too (ratios need both sides).
    assert result["warm"]["manifest"]["limit"]["tag"]["rps"] > 0
    for name in ("nginx_warm", "pullgate_warm"):
        assert result["concurrent"][name]["ok"] == 16, name
    # The cold floor: never below nginx's own wall time, every part of it measured.
    floor = result["concurrent"]["cold_floor"]
    assert floor["wall_seconds"] >= result["concurrent"]["nginx_warm"]["wall_seconds"]
    assert floor["sha256_cpu_seconds"] > 0 and floor["write_new_file_cpu_seconds"] > 0
    assert floor["upstream_get_machine_cpu_seconds"] >= 0  # /proc/stat ticks: 16 MiB may take under one
    assert "the least any cache could take cold here" in done.stdout


@pytest.mark.e2e
def test_storm_quick(tmp_path: Path) -> None:
    """The rollout-storm benchmark runs end to end: every client got every verified byte and
    each blob reached the upstream once."""
    out = tmp_path / "storm.json"
    done = run([sys.executable, str(ROOT / "bench" / "bench_storm.py"), "--quick", "--out", str(out)], timeout=200)
    assert "| storm wall," in done.stdout
    result = json.loads(out.read_text())
    assert result["storm"]["ok"] == result["storm"]["clients"] == 20
    assert result["warm"]["ok"] == 20
    assert result["upstream_gets_per_blob"] == [1]
    assert result["manifest_probes"] > 0 and result["manifest_probe_errors"] == 0


@pytest.mark.e2e
def test_redirect_quick(tmp_path: Path) -> None:
    """The redirect-mode benchmark runs end to end: every timed GET through pullgate was a
    307 followed to the object store (checked inside) and each path moved the whole blob."""
    out = tmp_path / "redirect.json"
    done = run([sys.executable, str(ROOT / "bench" / "bench_redirect.py"), "--quick", "--out", str(out)], timeout=240)
    assert "| redirect mode: blob GET via 307 to the object store," in done.stdout
    result = json.loads(out.read_text())
    for name in ("redirect", "direct", "local"):
        assert result[name]["gbps"] > 0 and len(result[name]["seconds"]) == result["plan"]["reps"], name
    assert result["redirect_answer_ms"]["median"] > 0


@pytest.mark.e2e
def test_cluster_quick(tmp_path: Path) -> None:
    """The scale-out storm benchmark runs end to end (one replica, three replicas on SeaweedFS
    and Redis, the reference proxy): every client completed its pull, and pullgate fetched
    each blob from upstream once, whether one replica or three."""
    out = tmp_path / "cluster.json"
    done = run([sys.executable, str(ROOT / "bench" / "bench_cluster.py"), "--quick", "--out", str(out)], timeout=240)
    assert "| pullgate, 3 replicas (SeaweedFS S3 + Redis) |" in done.stdout
    result = json.loads(out.read_text())
    for setup in ("one", "three", "reference"):
        assert result[setup]["ok"] == result[setup]["clients"] == 10, result[setup]
    assert result["one"]["upstream_gets_per_blob"] == result["three"]["upstream_gets_per_blob"] == [1], result["three"][
        "cluster_metrics"
    ]
    assert len(result["three"]["rss_peak_kib"]) == 3


# --- the storm's clients (bench/nodes.py) ------------------------------------------------
MANIFEST, LAYER = b'{"schemaVersion": 2}', b"layer bytes " * 1000


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _serve(manifest: bytes, layer: bytes, *, short: bool = False) -> web.Application:
    async def get_manifest(request: web.Request) -> web.Response:
        return web.Response(body=manifest, content_type="application/vnd.oci.image.manifest.v1+json")

    async def get_blob(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(LAYER))})
        await response.prepare(request)
        await response.write(layer[: len(layer) // 2] if short else layer)
        if short:  # the connection is cut short of Content-Length
            assert request.transport is not None
            request.transport.close()
        return response

    app = web.Application()
    app.router.add_get("/v2/library/x/manifests/1", get_manifest)
    app.router.add_get("/v2/library/x/blobs/{digest}", get_blob)
    return app


@pytest.mark.parametrize(
    ("served_manifest", "served_layer", "short", "ok_nodes"),
    [
        (MANIFEST, LAYER, False, [0, 1, 2, 3]),
        # Same size, other bytes: only the nodes that hash (every 2nd) can tell.
        (MANIFEST, LAYER.replace(b"l", b"L"), False, [1, 3]),
        # The manifest is always hashed: every node fails.
        (MANIFEST + b" ", LAYER, False, []),
        # A body cut short of its Content-Length: no node counts it complete.
        (MANIFEST, LAYER, True, []),
    ],
    ids=["all-good", "wrong-layer-bytes", "wrong-manifest", "cut-short"],
)
async def test_storm_nodes_count_only_verified_complete_pulls(
    aiohttp_server: ServerFactory, served_manifest: bytes, served_layer: bytes, short: bool, ok_nodes: list[int]
) -> None:
    """The storm's verdict "complete, verified pulls" rests on its clients: a node is ok only
    if the manifest hashed to its digest, every body was whole, and (nodes that sample)
    every layer hashed to its digest."""
    server = await aiohttp_server(_serve(served_manifest, served_layer, short=short))
    job = nodes.Job(
        "127.0.0.1",
        server.port,
        "library/x",
        "1",
        "*/*",
        _sha(MANIFEST),
        [(_sha(LAYER), len(LAYER))],
        nodes=[0, 1, 2, 3],
        sample_every=2,
    )
    wall, results = await asyncio.to_thread(nodes.run, job, 2, 0)
    assert wall > 0 and len(results) == 4
    assert sorted(r["node"] for r in results) == [0, 1, 2, 3]
    assert sorted(r["node"] for r in results if r["ok"]) == ok_nodes
