import time

import pytest

from proxy.registry.upstream.challenge import TokenCache, parse_challenge


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"',
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:pull",
            },
        ),
        ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
        ("bearer realm=https://x/t, service=svc", "bearer", {"realm": "https://x/t", "service": "svc"}),
        ('Bearer realm="a\\"b",error="insufficient_scope"', "bearer", {"realm": 'a"b', "error": "insufficient_scope"}),
    ],
)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    challenge = parse_challenge(header)
    assert challenge is not None
    assert challenge.scheme == scheme
    assert challenge.params == params


@pytest.mark.parametrize("header", [None, ""])
def test_no_challenge(header: str | None) -> None:
    assert parse_challenge(header) is None


def test_token_cache_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TokenCache()
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now)
    cache.put("r", "s", "scope", "tok", 60)
    assert cache.get("r", "s", "scope") == "tok"
    assert cache.get("r", "s", "other") is None
    monkeypatch.setattr(time, "monotonic", lambda: now + 56)
    assert cache.get("r", "s", "scope") is None  # refreshed a little before expiry
    cache.put("r", "s", "scope", "tok2", None)  # default lifetime 60 s
    assert cache.get("r", "s", "scope") == "tok2"
