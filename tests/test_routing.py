import pytest

from proxy.config.settings import Config, UpstreamConfig
from proxy.errors import NameInvalid, NameUnknown
from proxy.oci.reference import ImageReference
from proxy.registry.routing import Route, Router, registry_name

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
        # every spelling of a configured host routes to it (issue 13 finding 3) ...
        ("owner/app", "GHCR.IO", Route("ghcr.io", "owner/app", "GHCR.IO"), None),
        ("owner/app", "GhCr.Io", Route("ghcr.io", "owner/app", "GhCr.Io"), None),
        ("owner/app", "ghcr.io:443", Route("ghcr.io", "owner/app", "ghcr.io:443"), None),
        ("alpine", "INDEX.DOCKER.IO", Route("docker.io", "library/alpine", "INDEX.DOCKER.IO"), None),
        ("alpine", "registry.hub.docker.com", Route("docker.io", "library/alpine", "registry.hub.docker.com"), None),
        ("x/y", "127.0.0.1:05001", Route("local", "x/y", "127.0.0.1:05001"), None),
        ("GHCR.IO/owner/app", None, Route("ghcr.io", "owner/app"), None),
        ("GhCr.Io/owner/app", None, Route("ghcr.io", "owner/app"), None),
        ("ghcr.io:443/owner/app", None, Route("ghcr.io", "owner/app"), None),
        ("index.docker.io/alpine", None, Route("docker.io", "library/alpine"), None),
        ("registry-1.docker.io:443/acme/app", None, Route("docker.io", "acme/app"), None),
        ("127.0.0.1:5001/x", None, Route("local", "x"), None),
        # ... and the repository after it is a repository name: lowercase (issue 15 item 14)
        ("ghcr.io/Owner/app", None, None, NameInvalid),
        ("owner/App", "ghcr.io", None, NameInvalid),
        # a registry that is not configured is said so, never asked of default_upstream (issue 15 item 5)
        ("quay.io/foo/bar", None, None, NameUnknown),
        ("QUAY.IO/foo/bar", None, None, NameUnknown),
        ("localhost/foo", None, None, NameUnknown),
        ("localhost:5000/foo", None, None, NameUnknown),
        ("ghcr.io:8443/owner/app", None, None, NameUnknown),  # another port: another registry
        ("foo/bar", "quay.io", None, NameUnknown),
        # a host-shaped component that is no valid host is refused
        ("ghcr.io./owner/app", None, None, NameInvalid),
        ("Foo/bar", None, None, NameInvalid),
        ("owner/app", "ghcr.io.", None, NameInvalid),
        ("owner/app", "ghcr.io:99999", None, NameInvalid),
        ("app\n", None, None, NameInvalid),  # %0A in a path: no other spelling of "app"
        ("ghcr.io\n/owner/app", None, None, NameInvalid),
        ("owner/app", "ghcr.io\n", None, NameInvalid),
    ],
)
def test_route(name: str, ns: str | None, expected: Route | None, error: type[Exception] | None) -> None:
    router = Router(CONFIG)
    for _ in range(2):  # the second answer comes from the router's memory; a refusal is never remembered
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


@pytest.mark.parametrize(
    ("name", "ns", "message"),
    [
        ("quay.io/foo/bar", None, "registry quay.io is not mirrored here"),
        ("QUAY.IO:443/foo/bar", None, "registry quay.io is not mirrored here"),
        ("foo/bar", "quay.io", "registry quay.io is not mirrored here"),
        ("foo/bar", "Quay.IO:443", "registry quay.io is not mirrored here"),
        ("foo/bar", "nothere", "registry 'nothere' is not mirrored here"),
        ("library/Hello", None, "repository names are lowercase"),
    ],
)
def test_refusals_say_why(name: str, ns: str | None, message: str) -> None:
    with pytest.raises((NameUnknown, NameInvalid)) as info:
        Router(CONFIG).route(name, ns)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("upstream", "registry"),
    [
        (UpstreamConfig("docker.io", "https://registry-1.docker.io"), "docker.io"),
        (UpstreamConfig("hub", "https://registry-1.docker.io"), "docker.io"),
        (UpstreamConfig("GHCR.IO", "https://ghcr.io"), "ghcr.io"),
        (UpstreamConfig("private", "https://Registry.Example:443"), "registry.example"),
        (UpstreamConfig("local", "http://127.0.0.1:5001"), "127.0.0.1:5001"),
    ],
)
def test_registry_name_is_the_normalized_host(upstream: UpstreamConfig, registry: str) -> None:
    assert registry_name(upstream) == registry
    router = Router(Config(upstreams=(upstream,), default_upstream=upstream.name))
    assert router.registry(upstream.name) == registry
    # a reference to that registry routes back to the upstream, however it is spelt
    assert router.route_image(ImageReference.parse(f"{registry.upper()}/team/app:1")).upstream == upstream.name


def test_docker_hub_upstream_under_another_name_gets_library() -> None:
    router = Router(Config(upstreams=(UpstreamConfig("hub", "https://registry-1.docker.io"),), default_upstream="hub"))
    assert router.route("alpine", None) == Route("hub", "library/alpine")
    assert router.route("alpine", "docker.io") == Route("hub", "library/alpine", "docker.io")
    assert router.route("docker.io/alpine", None) == Route("hub", "library/alpine")
