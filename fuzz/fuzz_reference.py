"""Coverage-guided fuzz target (atheris / libFuzzer): image references, digests, tags and
repository names — everything a client or a Pod spec names an image with.

    python fuzz/fuzz_reference.py NEW_DIR fuzz/corpus/reference -max_total_time=60

New inputs go to the first directory; fold what adds coverage into the committed corpus with
``fuzz/minimize.py``. ``tests/test_fuzz.py`` replays that corpus on every run and fuzzes
from it for a few seconds.
Properties: only ``PullgateError`` escapes a parser or normalizer; normalizing is
idempotent (a parsed reference prints back to itself, a normalized host or pattern
normalizes to itself); and no spelling of a host changes a reference: the registry in
upper case, or with its default port, parses to the same reference.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # instrument our modules only: instrument_all() takes ~10 s
    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        from proxy.errors import PullgateError
        from proxy.oci.digest import Digest
        from proxy.oci.reference import (
            ImageReference,
            normalize_host,
            normalize_pattern,
            normalize_reference_pattern,
            normalize_registry_pattern,
            validate_repository,
            validate_tag,
        )
else:
    from proxy.errors import PullgateError
    from proxy.oci.digest import Digest
    from proxy.oci.reference import (
        ImageReference,
        normalize_host,
        normalize_pattern,
        normalize_reference_pattern,
        normalize_registry_pattern,
        validate_repository,
        validate_tag,
    )


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for parse in (Digest.parse, validate_tag, validate_repository):
        with contextlib.suppress(PullgateError):
            parse(text)
    for normalize in (normalize_host, normalize_pattern, normalize_reference_pattern, normalize_registry_pattern):
        try:
            once = normalize(text)
        except PullgateError:
            continue
        if normalize(once) != once:
            raise AssertionError(f"{normalize.__name__}: {text!r} -> {once!r} -> {normalize(once)!r}")
    try:
        ref = ImageReference.parse(text)
    except PullgateError:
        return
    again = ImageReference.parse(str(ref))
    if again != ref:
        raise AssertionError(f"{text!r} -> {ref} -> {again}")
    if ref.digest is not None:
        Digest.parse(str(ref.digest))
    for spelling in spellings(ref):
        if ImageReference.parse(spelling) != ref:
            raise AssertionError(f"{spelling!r} is not {ref}")


def spellings(ref: ImageReference) -> list[str]:
    """Other spellings of ``ref``'s registry that must name the same image."""
    rest = str(ref)[len(ref.registry) :]
    found = [ref.registry.upper() + rest]
    if not ref.registry.endswith("]") and ":" not in ref.registry.rpartition("]")[2]:
        found += [f"{ref.registry}:443{rest}", f"{ref.registry.upper()}:0080{rest}"]
    return found


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
