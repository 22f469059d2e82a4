"""The untrusted-JSON parser (``proxy.oci.jsondoc``): size and depth are bounded before
``json.loads`` runs, and every failure is the caller's error type, never ``RecursionError``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from proxy.errors import ManifestInvalid, PullgateError
from proxy.oci.jsondoc import JsonInvalid, nesting_depth, parse, parse_object

DEEP = b"[" * 200_000 + b"]" * 200_000


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("data", "options", "expected", "error"),
    [
        (b'{"a": [1, {"b": null}]}', {}, {"a": [1, {"b": None}]}, None),
        ('{"a": "[[[[[[["}', {"max_depth": 1}, {"a": "[[[[[[["}, None),  # brackets in strings do not nest
        (b'{"a": "\\"[[["}', {"max_depth": 1}, {"a": '"[[['}, None),  # nor after an escaped quote
        (b"\xef\xbb\xbf{}", {}, {}, None),  # a UTF-8 byte-order mark, as json.loads(bytes) allows
        (b"[" * 64 + b"]" * 64, {}, _nested(64), None),
        (b"[" * 65 + b"]" * 65, {}, "nests deeper than 64 levels", JsonInvalid),
        (DEEP, {}, "nests deeper than 64 levels", JsonInvalid),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, {}, "nests deeper than 64 levels", JsonInvalid),
        (b"[" * 100_000, {}, "nests deeper than 64 levels", JsonInvalid),  # unterminated: still bounded
        (b'"' + b"[" * 100_000, {}, "nests deeper than 64 levels", JsonInvalid),  # unterminated string too
        (b"{}" + b" " * 20, {"max_bytes": 10}, "larger than 10 bytes", JsonInvalid),
        (b"", {}, "is not JSON", JsonInvalid),
        (b"{not json", {}, "is not JSON", JsonInvalid),
        (b"\xff\xfe{\x00}\x00", {}, "not UTF-8", JsonInvalid),  # UTF-16: not what registries send
        (b'{"a": NaN}', {}, "NaN is not JSON", JsonInvalid),
        (b"[Infinity]", {}, "Infinity is not JSON", JsonInvalid),
        (b"1" * 5000, {}, "is not JSON", JsonInvalid),  # past Python's int digit limit: ValueError, not a crash
        (b"[]", {"error": ManifestInvalid}, [], None),
        (DEEP, {"error": ManifestInvalid, "what": "manifest"}, "manifest nests deeper", ManifestInvalid),
    ],
    ids=lambda value: repr(value[:30]) if isinstance(value, bytes | str) else None,
)
def test_parse(data: bytes | str, options: dict[str, Any], expected: Any, error: type[PullgateError] | None) -> None:
    what = options.pop("what", "document")
    if error is not None:
        with pytest.raises(error) as info:
            parse(data, what, **options)
        assert expected in info.value.message
        return
    assert parse(data, what, **options) == expected


@pytest.mark.parametrize(
    ("data", "error"),
    [(b"[]", "is not a JSON object"), (b'"x"', "is not a JSON object"), (b"null", "is not a JSON object")],
)
def test_parse_object_wants_an_object(data: bytes, error: str) -> None:
    with pytest.raises(JsonInvalid, match=error):
        parse_object(data, "document")
    assert parse_object(b'{"k": 1}') == {"k": 1}


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("", 0),
        ("1", 0),
        ("[]", 1),
        ('{"a": [{"b": [1]}]}', 4),
        ('["]]]]", [[]]]', 3),
        ('"\\\\" [', 1),  # an escaped backslash ends the string's escapes
        ("[]]]][[", 1),
    ],
)
def test_nesting_depth(text: str, depth: int) -> None:
    assert nesting_depth(text) == depth


def test_depth_bound_holds_whatever_the_recursion_budget() -> None:
    """The limit is checked before parsing, so a deep document is refused even when the
    caller's own stack is nearly full (json.loads would otherwise raise RecursionError)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(120)
    try:
        with pytest.raises(JsonInvalid, match="nests deeper"):
            parse(DEEP)
        assert parse(b"[" * 30 + b"]" * 30, max_depth=64) is not None
    finally:
        sys.setrecursionlimit(limit)


def test_large_documents_stay_linear() -> None:
    """A 4 MiB manifest (the default max_manifest_size) of 20,000 layers whose annotations
    are full of brackets parses in well under a second on top of json.loads."""
    layer = {"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": 1, "annotations": {"a": "[{" * 50}}
    body = json.dumps({"schemaVersion": 2, "layers": [layer] * 20_000}).encode()
    assert len(body) > 3_500_000
    started = time.perf_counter()
    assert parse_object(body, "manifest")["schemaVersion"] == 2
    assert time.perf_counter() - started < 2.0
    started = time.perf_counter()
    with pytest.raises(JsonInvalid):
        parse(DEEP * 5)
    assert time.perf_counter() - started < 1.0
