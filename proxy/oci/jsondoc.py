"""Untrusted JSON: the one parser for every document pullgate did not write itself —
upstream manifests, image configs, referrers indexes, token responses, signature payloads
and bundles, Rekor entries, and clients' AdmissionReview bodies.

``json.loads`` recurses once per nesting level: ``[[[…]]]`` 200,000 levels deep (400 kB)
raises ``RecursionError``, which no caller expects. So the size and the nesting depth are
checked first, without recursion, in time linear in the size (regular expressions and
C-level iteration; no Python loop per byte): strings are cut out (brackets in them do not
nest), the brackets left are counted. Only then does ``json.loads`` run.

The text must be UTF-8 (RFC 8259 §8.1; a leading byte-order mark is tolerated as
``json.loads`` tolerates it), and ``NaN``/``Infinity``, which RFC 8259 does not allow,
are refused. Every failure is one error, of the caller's type, saying what was wrong.
"""

from __future__ import annotations

import json
import operator
import re
from itertools import accumulate, count
from typing import Any

from proxy.errors import PullgateError

MAX_BYTES = 32 << 20  # nothing pullgate parses is legitimately bigger (manifests: 4 MiB)
MAX_DEPTH = 64  # OCI manifests, configs, indexes and signatures nest 5-6 levels

# A JSON string, escapes included; possessive, so an unterminated one costs one scan.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
# Opening brackets count 2, closing 0: depth after n brackets is (running sum - n).
_DELTAS = bytes.maketrans(b"[]{}", b"\x02\x00\x02\x00")


class JsonInvalid(PullgateError):
    """Untrusted JSON that is too large, too deep, not JSON, or not the expected shape."""

    code, status = "BAD_REQUEST", 400


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of ``text``, strings excluded. Never lower than what
    ``json.loads`` would reach before it fails (an unterminated string counts its brackets)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii").translate(_DELTAS)
    if not brackets:
        return 0
    depth: int = max(map(operator.sub, accumulate(brackets), count(1)))
    return depth


def parse(
    data: bytes | str,
    what: str = "document",
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[PullgateError] = JsonInvalid,
) -> Any:
    """Any JSON value of ``data``; ``error`` (constructed with a message naming ``what``)
    when it is larger than ``max_bytes``, nests deeper than ``max_depth`` or is not JSON."""
    if len(data) > max_bytes:
        raise error(f"{what} is larger than {max_bytes} bytes")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    else:
        text = data
    text = text.removeprefix("\ufeff")
    # Fewer opening brackets than the limit cannot nest past it: most documents stop here.
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        raise error(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: a caller's deep stack plus max_depth
        raise error(f"{what} is not JSON: {str(exc)[:200]}") from exc


def parse_object(
    data: bytes | str,
    what: str = "document",
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[PullgateError] = JsonInvalid,
) -> dict[str, Any]:
    """A JSON object, or ``error`` (see ``parse``; also when the value is not an object)."""
    value = parse(data, what, max_bytes=max_bytes, max_depth=max_depth, error=error)
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")
