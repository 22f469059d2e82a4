"""Coverage-guided fuzz target (atheris / libFuzzer): the manifest parser, which reads
whatever bytes an upstream sends (``proxy.oci.mediatypes.parse_manifest``), and the platform
pick for clients that cannot take an index.

    python fuzz/fuzz_manifest.py NEW_DIR fuzz/corpus/manifest -max_total_time=60

The first input byte picks the response's Content-Type, the rest is the body.
Properties: only ``PullgateError`` escapes; what parses has a known media type and
descriptors with valid digests and sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # instrument our modules only: instrument_all() takes ~10 s
    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        from proxy.errors import PullgateError
        from proxy.oci.digest import Digest
        from proxy.oci.mediatypes import MANIFEST_TYPES, parse_manifest, pick_platform
else:
    from proxy.errors import PullgateError
    from proxy.oci.digest import Digest
    from proxy.oci.mediatypes import MANIFEST_TYPES, parse_manifest, pick_platform

CONTENT_TYPES = (None, *sorted(MANIFEST_TYPES), "application/json", "text/html; charset=utf-8", "")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    content_type = CONTENT_TYPES[data[0] % len(CONTENT_TYPES)]
    try:
        parsed = parse_manifest(data[1:], content_type)
    except PullgateError:
        return
    if parsed.media_type not in MANIFEST_TYPES:
        raise AssertionError(f"unknown media type {parsed.media_type!r}")
    for child in parsed.children:
        Digest.parse(str(child.digest))
        if child.size < 0:
            raise AssertionError("negative size")
    if parsed.is_index:
        pick_platform(parsed)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
