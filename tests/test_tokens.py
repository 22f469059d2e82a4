
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


def test_token_cache_expiry() -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("r", "s", "scope", "tok", 60)
    assert cache.get("r", "s", "scope") == "tok"
    assert cache.get("r", "s", "other") is None
    now[0] += 56
    assert cache.get("r", "s", "scope") is None  # refreshed a little before expiry
    cache.put("r", "s", "scope", "tok2", None)  # default lifetime 60 s
    assert cache.get("r", "s", "scope") == "tok2"


def test_token_cache_drops_expired_tokens_and_stays_bounded() -> None:
    """Expired tokens are purged (not kept forever), and the cache holds at most its size."""
    now = [0.0]
    cache = TokenCache(max_tokens=3, clock=lambda: now[0])
    for i in range(5):
        cache.put("r", "s", f"repository:a{i}:pull", f"t{i}", 60)
    assert len(cache) == 3 and cache.get("r", "s", "repository:a4:pull") == "t4"
    now[0] += 120
    assert len(cache) == 0
