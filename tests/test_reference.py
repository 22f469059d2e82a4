import pytest

from proxy.errors import NameInvalid, PullgateError, TagInvalid
from proxy.oci.reference import ImageReference, validate_repository, validate_tag

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
        ("", None, NameInvalid),
        ("Nginx", None, NameInvalid),
        ("nginx:", None, TagInvalid),
        ("nginx:-bad", None, TagInvalid),
        ("nginx@sha256:short", None, PullgateError),
        (" nginx", None, NameInvalid),
        ("ghcr.io/../etc", None, NameInvalid),
        ("a//b", None, NameInvalid),
    ],
)
def test_parse_normalises_like_docker(text: str, expected: str | None, error: type[Exception] | None) -> None:
    if error is not None:
        with pytest.raises(error):
            ImageReference.parse(text)
        return
    assert str(ImageReference.parse(text)) == expected


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("library/alpine", True),
        ("a/b-c/d__e/f.g", True),
        ("a" * 256, False),
        ("UPPER", False),
        ("a/../b", False),
        ("a/./b", False),
        ("-a", False),
        ("a/", False),
        ("a%2Fb", False),
    ],
)
def test_validate_repository(name: str, ok: bool) -> None:
    if ok:
        assert validate_repository(name) == name
    else:
        with pytest.raises(NameInvalid):
            validate_repository(name)


@pytest.mark.parametrize(
    ("tag", "ok"), [("latest", True), ("v1.2.3-rc_1", True), ("_x", True), (".x", False), ("a" * 129, False)]
)
def test_validate_tag(tag: str, ok: bool) -> None:
    if ok:
        assert validate_tag(tag) == tag
    else:
        with pytest.raises(TagInvalid):
            validate_tag(tag)
