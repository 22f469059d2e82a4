"""Reading the JSON documents content trust handles (signature payloads, bundles, log
entries, trust roots): the one place they are parsed, so a size/depth-limited parser can
replace ``json.loads`` here with a one-line change."""

from __future__ import annotations

import json
from typing import Any

from proxy.errors import SignatureInvalid


def parse_json(data: bytes | str, what: str) -> Any:
    """Any JSON value; ``SignatureInvalid`` naming ``what`` when it is not JSON."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SignatureInvalid(f"{what} is not JSON: {exc}") from exc


def json_object(data: bytes | str, what: str) -> dict[str, Any]:
    doc = parse_json(data, what)
    if not isinstance(doc, dict):
        raise SignatureInvalid(f"{what} is not a JSON object")
    return doc
