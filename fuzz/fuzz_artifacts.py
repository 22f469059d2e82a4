"""Coverage-guided fuzz target (atheris / libFuzzer): what a manifest is
(``proxy.oci.artifacts.classify``) and whether a layer's bytes are a signature document
(``payload_matches``) — both read whatever an upstream or a pusher sends, and decide what
pull-time enforcement exempts.

    python fuzz/fuzz_artifacts.py NEW_DIR fuzz/corpus/artifacts -max_total_time=60

The first input byte picks the Content-Type (and the layer media type), the rest is the
body. Properties: nothing escapes (no exception at all); a signature artifact lists only
signature-typed layers for inspection; a document with a NUL byte is never a payload.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # instrument our modules only: instrument_all() takes ~10 s
    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        from proxy.oci.artifacts import SIGNATURE_LAYER_TYPES, Kind, classify, payload_matches
        from proxy.oci.mediatypes import MANIFEST_TYPES
else:
    from proxy.oci.artifacts import SIGNATURE_LAYER_TYPES, Kind, classify, payload_matches
    from proxy.oci.mediatypes import MANIFEST_TYPES

CONTENT_TYPES = (None, *sorted(MANIFEST_TYPES), "application/json", "")
LAYER_TYPES = (*sorted(SIGNATURE_LAYER_TYPES), "application/vnd.oci.image.layer.v1.tar+gzip")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    content_type = CONTENT_TYPES[data[0] % len(CONTENT_TYPES)]
    body = data[1:]
    artifact = classify(body, content_type)
    if artifact.kind is Kind.SIGNATURE and not artifact.inspect:
        raise AssertionError("a signature artifact with no layer to read")
    if any(d.media_type not in SIGNATURE_LAYER_TYPES for d in artifact.inspect):
        raise AssertionError("a non-signature layer listed as a signature layer")
    if artifact.kind is not Kind.SIGNATURE and artifact.inspect:
        raise AssertionError("layers to inspect for something that is no signature artifact")
    matches = payload_matches(LAYER_TYPES[data[0] % len(LAYER_TYPES)], body)
    if matches and b"\x00" in body:
        raise AssertionError("bytes with a NUL passed as a signature document")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
