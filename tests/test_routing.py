import pytest

from proxy.config.settings import Config, UpstreamConfig
from proxy.errors import NameInvalid, NameUnknown
from proxy.registry.routing import Route, Router

CONFIG = Config(
    upstreams=(
        UpstreamConfig("docker.io", "https://registry-1.docker.io"),
        UpstreamConfig("ghcr.io", "https://ghcr.io"),
        UpstreamConfig("local", "http://127.0.0.1:5001"),
    ),
    default_upstream="docker.io",
)


@pytest.mark.parametrize(
    ("name", "ns", "expected", "error"),
    [
        ("library/alpine", "docker.io", Route("docker.io", "library/alpine", "docker.io"), None),
        ("alpine", "docker.io", Route("docker.io", "library/alpine", "docker.io"), None),
        ("alpine", "registry-1.docker.io", Route("docker.io", "library/alpine", "registry-1.docker.io"), None),
        ("owner/app", "ghcr.io", Route("ghcr.io", "owner/app", "ghcr.io"), None),
        ("app", "ghcr.io", Route("ghcr.io", "app", "ghcr.io"), None),
        ("x/y", "127.0.0.1:5001", Route("local", "x/y", "127.0.0.1:5001"), None),
        ("ghcr.io/owner/app", None, Route("ghcr.io", "owner/app"), None),
        ("docker.io/alpine", None, Route("docker.io", "library/alpine"), None),
        ("local/x", None, Route("local", "x"), None),
        ("alpine", None, Route("docker.io", "library/alpine"), None),
        ("acme/app", None, Route("docker.io", "acme/app"), None),
        ("ghcr.io", None, Route("docker.io", "library/ghcr.io"), None),
        ("alpine", "evil.example", None, NameUnknown),
        ("alpine", "169.254.169.254", None, NameUnknown),
        ("Alpine", None, None, NameInvalid),
        ("ghcr.io/", None, None, NameInvalid),
        ("a/../b", None, None, NameInvalid),
    ],
)
def test_route(name: str, ns: str | None, expected: Route | None, error: type[Exception] | None) -> None:
    router = Router(CONFIG)
    if error:
        with pytest.raises(error):
            router.route(name, ns)
    else:
        assert router.route(name, ns) == expected


def test_no_default_upstream() -> None:
    router = Router(Config(upstreams=CONFIG.upstreams, default_upstream=None))
    with pytest.raises(NameUnknown, match="no default_upstream"):
        router.route("alpine", None)
    assert router.route("ghcr.io/a/b", None) == Route("ghcr.io", "a/b")
