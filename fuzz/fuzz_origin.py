"""Coverage-guided fuzz target (atheris / libFuzzer): where the mirror may send its upstream
credentials — a registry's ``WWW-Authenticate`` challenge (``parse_challenge``) and the
realm URL it names, judged by origin (``origin_of``, ``AuthOrigins``). Both come from a
possibly hostile upstream.

    python fuzz/fuzz_origin.py NEW_DIR fuzz/corpus/origin -max_total_time=60

The input is the header value (UTF-8, errors replaced). Properties: nothing escapes; an
origin is lower-case http(s) with a port in range; a realm is allowed exactly when its
origin is one of the allowed ones — the upstream's own, here ``http://127.0.0.1:5000``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # instrument our modules only: instrument_all() takes ~10 s
    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        from proxy.registry.upstream.challenge import AuthOrigins, origin_of, parse_challenge
else:
    from proxy.registry.upstream.challenge import AuthOrigins, origin_of, parse_challenge

ALLOWED = AuthOrigins("http://127.0.0.1:5000", (), (), "upstreams.fuzz.auth_hosts")
OWN = ("http", "127.0.0.1", 5000)


def test_one_input(data: bytes) -> None:
    header = data.decode("utf-8", errors="replace")
    challenge = parse_challenge(header)
    realm = challenge.realm if challenge is not None and challenge.realm is not None else header
    origin = origin_of(realm)
    if origin is not None:
        scheme, host, port = origin
        if scheme not in ("http", "https") or not host or host != host.lower() or not 0 <= port <= 65535:
            raise AssertionError(f"bad origin {origin!r}")
    if ALLOWED.allows(realm) != (origin == OWN):
        raise AssertionError(f"allows() disagrees with the origin for {realm!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
