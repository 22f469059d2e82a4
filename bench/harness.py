"""What every scenario benchmark does around its measurements: parse the common options,
arm a deadline, run in a throwaway directory, write the JSON result and render the
markdown table. The scenarios (``bench_storm``, ``bench_redirect``, ``bench_cluster``)
keep only what they measure."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench_mirror as bm


def parser(description: str | None, name: str, quick_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, help=f"JSON result file (default: bench/results/{name}-<time>.json)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, caches) for inspection")
    return p


def run(
    name: str, args: argparse.Namespace, plan: Any, deadline: int, measure: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """``measure(work_dir)`` under a deadline (SIGALRM); the result with mode, plan, environment
    and ``seconds`` (wall time of the whole run)."""
    signal.signal(signal.SIGALRM, bm._alarm)
    signal.alarm(deadline)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"pullgate-{name}-"))
    try:
        result = {"mode": "quick" if args.quick else "full", "plan": plan.__dict__, "env": bm.environment(),
                  **measure(work)}  # fmt: skip
    finally:
        signal.alarm(0)
        if args.keep:
            bm.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def save(name: str, args: argparse.Namespace, result: dict[str, Any]) -> Path:
    out: Path = args.out or bm.ROOT / "bench" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])  # fmt: skip
