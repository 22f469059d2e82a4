"""Fold new fuzzer finds into a committed corpus, keeping only inputs that add coverage.

    python fuzz/minimize.py fuzz_manifest NEW_DIR

(libFuzzer's own ``-merge=1`` finds no features under atheris here, so this does the set
cover greedily: smallest inputs first, each kept if ``-runs=0`` over the corpus plus it
reports more features than without it.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
_FEATURES = re.compile(r"INITED cov: \d+ ft: (\d+)")


def features(target: str, corpus: Path) -> int:
    result = subprocess.run(
        [sys.executable, str(FUZZ / f"{target}.py"), "-runs=0", str(corpus)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    match = _FEATURES.search(result.stderr)
    if match is None:
        raise SystemExit(f"no INITED line from {target}:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    target, new = sys.argv[1], Path(sys.argv[2])
    corpus = FUZZ / "corpus" / target.removeprefix("fuzz_")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for path in corpus.iterdir():
            shutil.copy(path, work / path.name)
        best = features(target, work)
        for candidate in sorted(new.iterdir(), key=lambda p: p.stat().st_size):
            shutil.copy(candidate, work / candidate.name)
            found = features(target, work)
            if found > best:
                best = found
                shutil.copy(candidate, corpus / candidate.name)
                print(f"kept {candidate.name}: {found} features")
            else:
                (work / candidate.name).unlink()
    print(f"{target}: {len(list(corpus.iterdir()))} inputs, {best} features")


if __name__ == "__main__":
    main()
