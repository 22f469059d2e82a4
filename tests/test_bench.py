"""The benchmark runs end to end (``bench/bench_mirror.py --quick``: small blobs, 1 s wrk
runs, ~15 s): it prints its table, and the 16 concurrent cold GETs through pullgate reached
the upstream exactly once (request coalescing) with every client getting the whole blob."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.procs import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run([sys.executable, str(ROOT / "bench" / "bench_mirror.py"), "--quick", "--out", str(out)],
               timeout=120)
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
    assert result["one"]["upstream_gets_per_blob"] == result["three"]["upstream_gets_per_blob"] == [1], (
        result["three"]["cluster_metrics"]
    )
    assert len(result["three"]["rss_peak_kib"]) == 3
