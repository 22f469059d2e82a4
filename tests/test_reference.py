"""The one naming rule (``proxy.oci.reference``): references, hosts, repositories and the
patterns policies match them with. Every spelling of one image normalizes to one text, or
is refused with ``NameInvalid``/``TagInvalid`` saying why."""

import pytest

from proxy.errors import DigestInvalid, NameInvalid, PullgateError, TagInvalid
from proxy.oci.reference import (
    ImageReference,
    is_registry_host,
    normalize_host,
    normalize_pattern,
    normalize_reference_pattern,
    normalize_registry_pattern,
    split_host,
    validate_repository,
    validate_tag,
)

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected", "error"),
    [
        ("nginx", "docker.io/library/nginx:latest", None),
        ("nginx:1.25", "docker.io/library/nginx:1.25", None),
        ("library/nginx", "docker.io/library/nginx:latest", None),
        ("docker.io/nginx", "docker.io/library/nginx:latest", None),
        ("index.docker.io/acme/app:v1", "docker.io/acme/app:v1", None),
        ("localhost:5000/x", "localhost:5000/x:latest", None),
        ("localhost/x:1", "localhost/x:1", None),
        ("ghcr.io/acme/app/sub:1", "ghcr.io/acme/app/sub:1", None),
        (f"ghcr.io/acme/app@{D}", f"ghcr.io/acme/app@{D}", None),
        (f"ghcr.io/acme/app:1.0@{D}", f"ghcr.io/acme/app:1.0@{D}", None),
        ("[::1]:5000/x:2", "[::1]:5000/x:2", None),
        ("acme/app", "docker.io/acme/app:latest", None),
        # issue 13 finding 3: every spelling of one host is one host
        ("GHCR.IO/acme/app:1.0", "ghcr.io/acme/app:1.0", None),
        ("GhCr.Io/acme/app:1.0", "ghcr.io/acme/app:1.0", None),
        ("ghcr.io:443/acme/app:1.0", "ghcr.io/acme/app:1.0", None),
        ("ghcr.io:0443/acme/app:1.0", "ghcr.io/acme/app:1.0", None),
        ("ghcr.io:80/acme/app:1.0", "ghcr.io/acme/app:1.0", None),
        ("GHCR.IO:443/acme/app:1.0", "ghcr.io/acme/app:1.0", None),
        ("ghcr.io:8443/acme/app", "ghcr.io:8443/acme/app:latest", None),
        ("ghcr.io:08443/acme/app", "ghcr.io:8443/acme/app:latest", None),
        # Docker Hub's names, in any case and with its default port
        ("registry-1.docker.io/nginx", "docker.io/library/nginx:latest", None),
        ("REGISTRY-1.DOCKER.IO/nginx", "docker.io/library/nginx:latest", None),
        ("registry.hub.docker.com/acme/app", "docker.io/acme/app:latest", None),
        ("index.docker.io:443/nginx", "docker.io/library/nginx:latest", None),
        ("docker.io:5000/nginx", "docker.io:5000/nginx:latest", None),  # another port: another registry
        # IPv6 literals in their compressed form; a port-less bare name keeps its port
        ("[0:0:0:0:0:0:0:1]:443/x", "[::1]/x:latest", None),
        ("[FE80::1]:5000/x", "[fe80::1]:5000/x:latest", None),
        ("localhost:80/x", "localhost/x:latest", None),
        ("foo:443/x", "foo:443/x:latest", None),  # 'foo/x' would be a Docker Hub name
        # refused: never guessed at
        ("", None, NameInvalid),
        ("Nginx", None, NameInvalid),
        ("library/Hello", None, NameInvalid),
        ("Foo/bar", None, NameInvalid),
        ("ghcr.io./acme/app", None, NameInvalid),
        ("a_b.example/app", None, NameInvalid),
        ("ghcr.io:99999/x", None, NameInvalid),
        ("ghcr.io:0/x", None, NameInvalid),
        ("ghcr.io:/x", None, NameInvalid),
        ("[::g]/x", None, NameInvalid),
        ("[127.0.0.1]/x", None, NameInvalid),
        ("gh\u212acr.io/x", None, NameInvalid),  # KELVIN SIGN lowercases to 'k': not ASCII, refused
        ("ghcr.io/ACME/app", None, NameInvalid),
        ("nginx:", None, TagInvalid),
        ("nginx:-bad", None, TagInvalid),
        ("nginx@sha256:short", None, DigestInvalid),
        (" nginx", None, NameInvalid),
        ("ghcr.io/../etc", None, NameInvalid),
        ("a//b", None, NameInvalid),
    ],
)
def test_parse_normalizes_like_docker(text: str, expected: str | None, error: type[PullgateError] | None) -> None:
    if error is not None:
        with pytest.raises(error):
            ImageReference.parse(text)
        return
    ref = ImageReference.parse(text)
    assert str(ref) == expected
    assert ImageReference.parse(str(ref)) == ref  # normalizing twice changes nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("library/Hello", "invalid repository name 'library/Hello': repository names are lowercase ('library/hello')"),
        ("Nginx:1", "repository names are lowercase ('library/nginx')"),
        ("Foo/bar", "'Foo' is not a registry host (a host has a '.' or ':' or is localhost) and repository names are"),
        ("ghcr.io./x", "invalid image name 'ghcr.io./x': invalid registry host 'ghcr.io.'"),
        ("ghcr.io:70000/x", "port out of range"),
        ("a/-b", "components of lowercase letters and digits"),
    ],
)
def test_refusals_say_why(text: str, message: str) -> None:
    with pytest.raises(NameInvalid) as info:
        ImageReference.parse(text)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("host", "expected", "error"),
    [
        ("ghcr.io", "ghcr.io", None),
        ("GHCR.IO", "ghcr.io", None),
        ("ghcr.io:443", "ghcr.io", None),
        ("ghcr.io:80", "ghcr.io", None),
        ("ghcr.io:000443", "ghcr.io", None),
        ("ghcr.io:5000", "ghcr.io:5000", None),
        ("docker.io", "docker.io", None),
        ("index.docker.io", "docker.io", None),
        ("Registry-1.Docker.IO:443", "docker.io", None),
        ("registry.hub.docker.com", "docker.io", None),
        ("localhost", "localhost", None),
        ("LOCALHOST:443", "localhost", None),
        ("127.0.0.1:5000", "127.0.0.1:5000", None),
        ("[::1]", "[::1]", None),
        ("[0::1]:443", "[::1]", None),
        ("[::FFFF:7F00:1]", "[::ffff:7f00:1]", None),
        ("foo:443", "foo:443", None),
        ("foo", "foo", None),
        ("", None, NameInvalid),
        ("ghcr.io.", None, NameInvalid),
        ("-ghcr.io", None, NameInvalid),
        ("gh_cr.io", None, NameInvalid),
        ("ghcr.io:65536", None, NameInvalid),
        ("ghcr.io:-1", None, NameInvalid),
        ("ghcr.io:+443", None, NameInvalid),
        ("ghcr.io:\u0664\u0664\u0663", None, NameInvalid),  # Arabic-Indic digits are digits to int()
        ("[::1", None, NameInvalid),
        ("[fe80::1%eth0]", None, NameInvalid),
        ("ghcr.io/x", None, NameInvalid),
        ("a" * 301, None, NameInvalid),
        ("ghcr.io\n", None, NameInvalid),
    ],
)
def test_normalize_host(host: str, expected: str | None, error: type[PullgateError] | None) -> None:
    if error is not None:
        with pytest.raises(error):
            normalize_host(host)
        return
    assert normalize_host(host) == expected
    assert normalize_host(expected or "") == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ghcr.io/a/b", ("ghcr.io", "a/b")),
        ("GHCR.IO:443/a/b", ("ghcr.io", "a/b")),
        ("localhost/x", ("localhost", "x")),
        ("acme/app", (None, "acme/app")),
        ("ghcr.io", (None, "ghcr.io")),  # one component is never a host
        ("quay.io/foo/bar", ("quay.io", "foo/bar")),
    ],
)
def test_split_host(name: str, expected: tuple[str | None, str]) -> None:
    assert split_host(name) == expected


@pytest.mark.parametrize(
    ("component", "expected"),
    [("ghcr.io", True), ("localhost", True), ("127.0.0.1:5000", True), ("GHCR.IO", True), ("acme", False),
     ("Acme", False), ("ghcr.io.", False), ("foo:443", True)],
)
def test_is_registry_host(component: str, expected: bool) -> None:
    assert is_registry_host(component) is expected


@pytest.mark.parametrize(
    ("pattern", "expected", "error"),
    [
        # the glob rule, decided once (proxy.oci.reference.normalize_pattern)
        ("nginx", "docker.io/library/nginx", None),
        ("ngin*", "docker.io/library/ngin*", None),
        ("docker.io/ngin*", "docker.io/library/ngin*", None),  # once stayed as written in spec.match.images
        ("index.docker.io/ngin*", "docker.io/library/ngin*", None),
        ("docker.io/library/*", "docker.io/library/*", None),
        ("docker.io/**", "docker.io/**", None),
        ("docker.io/*/app", "docker.io/*/app", None),
        ("*", "docker.io/library/*", None),
        ("**", "**", None),
        ("acme/*", "docker.io/acme/*", None),
        ("ghcr.io/acme/**", "ghcr.io/acme/**", None),
        ("GHCR.IO/acme/**", "ghcr.io/acme/**", None),
        ("ghcr.io:443/acme/**", "ghcr.io/acme/**", None),
        ("*/acme/**", "*/acme/**", None),
        ("**/app", "**/app", None),
        ("*.GCR.io/**", "*.gcr.io/**", None),
        ("localhost:5000/x", "localhost:5000/x", None),
        ("ghcr.io/a-*/b.*", "ghcr.io/a-*/b.*", None),
        # issue 15 item 6: patterns that can never match are errors that say why
        ("NGINX", "repository names are lowercase", NameInvalid),
        ("ghcr.io/ACME/**", "repository names are lowercase", NameInvalid),
        ("Acme/app", "'Acme' is not a registry host", NameInvalid),
        ("docker.io/library/[abc", "'[' is not in any repository name", NameInvalid),
        ("ghcr.io/acme/app?", "'?' is not in any repository name", NameInvalid),
        ("ghcr.io/a//b", "can never match a repository name", NameInvalid),
        ("ghcr.io/-x", "can never match a repository name", NameInvalid),
        ("ghcr.io/", "names no repository", NameInvalid),
        ("ghcr.io./x", "invalid registry host", NameInvalid),
        ("*!/x", "can never match a registry host", NameInvalid),
        ("", "is not an image pattern", NameInvalid),
        (" nginx", "is not an image pattern", NameInvalid),
        ("h\n.", "'\\n' is not in any repository name", NameInvalid),  # found by fuzz/fuzz_reference.py
    ],
)
def test_normalize_pattern(pattern: str, expected: str, error: type[PullgateError] | None) -> None:
    if error is not None:
        with pytest.raises(error) as info:
            normalize_pattern(pattern)
        assert expected in info.value.message
        return
    assert normalize_pattern(pattern) == expected
    assert normalize_pattern(expected) == expected


@pytest.mark.parametrize(
    ("pattern", "expected", "error"),
    [
        ("python:*", "docker.io/library/python:*", None),
        ("python:3.*", "docker.io/library/python:3.*", None),
        ("gcr.io/distroless/**", "gcr.io/distroless/**", None),
        ("GCR.IO/distroless/static:nonroot", "gcr.io/distroless/static:nonroot", None),
        ("x@sha256:*", "docker.io/library/x@sha256:*", None),
        ("x:1@*", "docker.io/library/x:1@*", None),
        ("python:3 .12", "with spaces", NameInvalid),
        ("python:[3]", "can never match a tag or digest", NameInvalid),
        ("python@md5", "can never match a tag or digest", NameInvalid),
        ("PYTHON:3", "repository names are lowercase", NameInvalid),
    ],
)
def test_normalize_reference_pattern(pattern: str, expected: str, error: type[PullgateError] | None) -> None:
    if error is not None:
        with pytest.raises(error) as info:
            normalize_reference_pattern(pattern)
        assert expected in info.value.message
        return
    assert normalize_reference_pattern(pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "expected", "error"),
    [
        ("ghcr.io", "ghcr.io", None),
        ("INDEX.DOCKER.IO", "docker.io", None),
        ("ghcr.io:443", "ghcr.io", None),
        ("*.acme.example", "*.acme.example", None),
        ("*.ACME.example", "*.acme.example", None),
        ("localhost:5000", "localhost:5000", None),
        ("quay", None, NameInvalid),  # names no registry: a host has a '.' or ':' or is localhost
        ("ghcr.io.", None, NameInvalid),
        ("*.acme_x.example", None, NameInvalid),
    ],
)
def test_normalize_registry_pattern(pattern: str, expected: str | None, error: type[PullgateError] | None) -> None:
    if error is not None:
        with pytest.raises(error):
            normalize_registry_pattern(pattern)
        return
    assert normalize_registry_pattern(pattern) == expected


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("library/alpine", None),
        ("a/b-c/d__e/f.g", None),
        ("a" * 256, "longer than 255"),
        ("UPPER", "repository names are lowercase ('upper')"),
        ("a/../b", "components of lowercase letters"),
        ("a/./b", "components of lowercase letters"),
        ("-a", "components of lowercase letters"),
        ("a/", "components of lowercase letters"),
        ("a%2Fb", "components of lowercase letters"),
        ("library/nginx\n", "components of lowercase letters"),  # '$' would match before a final newline
    ],
)
def test_validate_repository(name: str, error: str | None) -> None:
    if error is None:
        assert validate_repository(name) == name
        return
    with pytest.raises(NameInvalid) as info:
        validate_repository(name)
    assert error in info.value.message


@pytest.mark.parametrize(
    ("tag", "ok"),
    [("latest", True), ("v1.2.3-rc_1", True), ("_x", True), (".x", False), ("a" * 129, False), ("latest\n", False)],
)
def test_validate_tag(tag: str, ok: bool) -> None:
    if ok:
        assert validate_tag(tag) == tag
    else:
        with pytest.raises(TagInvalid):
            validate_tag(tag)
