"""Reading the JSON documents content trust handles (signature payloads, bundles, log
entries, trust roots): every one goes through ``proxy.oci.jsondoc``, the one parser of
untrusted JSON (size and nesting depth bounded before parsing), failing as
``SignatureInvalid`` so a bad document is a failed verification, never a crash."""

from __future__ import annotations

from typing import Any

from proxy.errors import SignatureInvalid
from proxy.oci import jsondoc


def parse_json(data: bytes | str, what: str) -> Any:
    """Any JSON value; ``SignatureInvalid`` naming ``what`` when it is not (bounded) JSON."""
    return jsondoc.parse(data, what, error=SignatureInvalid)


def json_object(data: bytes | str, what: str) -> dict[str, Any]:
    return jsondoc.parse_object(data, what, error=SignatureInvalid)
