#!/usr/bin/env python3
"""``pullgate import`` and ``pullgate export`` of a big image, against plain disk speed.

In a temp dir: one image of ``--size-mib`` (default 1024 MiB: four layers of random bytes,
gzip level 0) built as an OCI layout, turned into an archive by ``skopeo copy
oci:... oci-archive:...`` (a real tool's archive), then, each as its own process:

  1. ``pullgate import FILE`` into an empty cache (reads and verifies every blob, stages it,
     fsyncs and commits it): MB/s and peak RSS (``ru_maxrss`` from ``wait4``)
  2. ``pullgate export IMAGE -o FILE`` of the imported image (reads, verifies, writes, fsyncs)
  3. the disk itself: ``cp`` of the archive + ``fsync`` (read + write the same bytes), the
     reference for "bounded by disk speed"

Each step runs ``--reps`` times (fresh cache / output each time), median reported. The page
cache is not dropped, so reads may come from memory (as they would right after a download);
writes are fsynced, so they reach the disk. Prints a markdown table and writes JSON to
bench/results/ (``--out`` to choose). MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tests.support.images import build_image  # noqa: E402

MiB = 1 << 20
REF = "docker.io/library/bench:1"


def timed(args: list[str]) -> tuple[float, int, str]:
    """Run a command: (seconds, peak RSS in bytes, stdout); raises on failure."""
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err.read()[-2000:].decode()}")
    return seconds, usage.ru_maxrss * 1024, out.decode()


def pullgate(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args, "--config", str(config)]


def make_archive(work: Path, size_mib: int) -> Path:
    layers = [size_mib * MiB // 4] * 4
    build_image(work / "layout", "1", layers=layers, seed="bench-archive")
    archive = work / "skopeo.tar"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", f"oci:{work / 'layout'}:1", f"oci-archive:{archive}:{REF}"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    shutil.rmtree(work / "layout")
    return archive


def config_for(work: Path, name: str) -> Path:
    path = work / f"{name}.yaml"
    cache = {"dir": str(work / name), "max_size": "1TiB"}
    path.write_text(yaml.safe_dump({"cache": cache, "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9"}]}))
    return path


def copy_with_fsync(source: Path, dest: Path) -> float:
    started = time.monotonic()
    shutil.copyfile(source, dest)
    with dest.open("rb+") as f:
        os.fsync(f.fileno())
    return time.monotonic() - started


def measure(work: Path, archive: Path, reps: int) -> dict[str, Any]:
    size = archive.stat().st_size
    runs: dict[str, list[tuple[float, int]]] = {"import": [], "export": [], "disk": []}
    for rep in range(reps):
        config = config_for(work, f"cache-{rep}")
        seconds, rss, _ = timed(pullgate(config, "import", str(archive), "--json"))
        runs["import"].append((seconds, rss))
        out = work / f"export-{rep}.tar"
        seconds, rss, _ = timed(pullgate(config, "export", REF, "-o", str(out), "--json"))
        runs["export"].append((seconds, rss))
        runs["disk"].append((copy_with_fsync(archive, work / f"copy-{rep}.tar"), 0))
        for leftover in (out, work / f"copy-{rep}.tar"):
            leftover.unlink()
        shutil.rmtree(work / f"cache-{rep}")
    return {
        name: {
            "seconds": statistics.median(s for s, _ in values),
            "mb_per_s": size / statistics.median(s for s, _ in values) / 1e6,
            "peak_rss_mib": max(r for _, r in values) / MiB,
            "runs": [{"seconds": s, "peak_rss": r} for s, r in values],
        }
        for name, values in runs.items()
    } | {"archive_bytes": size}


def table(result: dict[str, Any]) -> str:
    lines = ["| measurement | MB/s | seconds | peak RSS |", "|---|---|---|---|"]
    labels = {
        "import": "pullgate import (skopeo oci-archive, verify + stage + fsync + commit)",
        "export": "pullgate export (verify + write + fsync)",
        "disk": "disk reference: cp + fsync of the archive",
    }
    for key, label in labels.items():
        r = result[key]
        rss = f"{r['peak_rss_mib']:.0f} MiB" if r["peak_rss_mib"] else "-"
        lines.append(f"| {label} | {r['mb_per_s']:.0f} | {r['seconds']:.2f} | {rss} |")
    ratio = result["import"]["mb_per_s"] / result["disk"]["mb_per_s"]
    lines.append(f"\narchive {result['archive_bytes'] / 1e6:.0f} MB; import at {ratio:.0%} of cp+fsync speed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, median reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, one repetition (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON result file (default: bench/results/archive-<time>.json)")
    parser.add_argument("--workdir", type=Path, help="work here instead of a temp dir (kept)")
    args = parser.parse_args(argv)
    size, reps = (64, 1) if args.quick else (args.size_mib, args.reps)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pullgate-bench-archive-", dir=os.environ.get("TMPDIR")))
    work.mkdir(parents=True, exist_ok=True)
    try:
        archive = make_archive(work, size)
        result = measure(work, archive, reps) | {"size_mib": size, "reps": reps, "machine": platform.platform()}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    out = args.out or ROOT / "bench" / "results" / f"archive-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
