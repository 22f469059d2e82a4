"""Coverage-guided fuzz target (atheris / libFuzzer): the untrusted-JSON parser
(``proxy.oci.jsondoc``) every upstream document and AdmissionReview goes through.

    python fuzz/fuzz_json.py NEW_DIR fuzz/corpus/json -max_total_time=60

The first input byte picks the depth limit (0-31), the rest is the document; each input is
also tried once nested 5,000 levels deep inside ``[…]`` (past Python's recursion limit).
Properties: only ``JsonInvalid`` escapes (never ``RecursionError``); what parses nests no
deeper than the limit and equals what ``json.loads`` reads; the depth check never reports
less than the real nesting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # instrument our modules only: instrument_all() takes ~10 s
    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        from proxy.oci.jsondoc import JsonInvalid, nesting_depth, parse
else:
    from proxy.oci.jsondoc import JsonInvalid, nesting_depth, parse

DEEP = 5_000


def depth_of(value: Any) -> int:
    """Nesting of a parsed value (bounded by the limit, so recursion is safe here)."""
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def test_one_input(data: bytes) -> None:
    if not data:
        return
    limit, body = data[0] % 32, data[1:]
    try:
        value = parse(body, max_depth=limit)
    except JsonInvalid:
        pass
    else:
        if depth_of(value) > limit:
            raise AssertionError(f"depth {depth_of(value)} > {limit}")
        if value != json.loads(body):
            raise AssertionError("differs from json.loads")
        if nesting_depth(body.decode("utf-8").removeprefix("\ufeff")) < depth_of(value):
            raise AssertionError("nesting_depth under-counts")
    try:
        parse(b"[" * DEEP + body + b"]" * DEEP, max_depth=limit)
    except JsonInvalid:
        return
    raise AssertionError("a 5,000-level document parsed")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
