import json

import pytest

from proxy.errors import ManifestInvalid
from proxy.oci.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    acceptable,
    parse_accept,
    parse_manifest,
    pick_platform,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def image(media_type: str | None = OCI_MANIFEST) -> dict[str, object]:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D1, "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 20}],
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def index(media_type: str = OCI_INDEX) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": D1,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {"mediaType": OCI_MANIFEST, "digest": D2, "size": 2, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }


@pytest.mark.parametrize(
    ("doc", "content_type", "expected_type", "children", "error"),
    [
        (image(), None, OCI_MANIFEST, [D1, D2], None),
        (image(DOCKER_MANIFEST), None, DOCKER_MANIFEST, [D1, D2], None),
        (image(None), OCI_MANIFEST + "; charset=utf-8", OCI_MANIFEST, [D1, D2], None),
        (image(None), None, OCI_MANIFEST, [D1, D2], None),
        (index(), None, OCI_INDEX, [D1, D2], None),
        (index(DOCKER_LIST), None, DOCKER_LIST, [D1, D2], None),
        ({"schemaVersion": 1, "name": "x"}, None, None, None, "schemaVersion 2"),
        (
            image("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            None,
            None,
            None,
            "unsupported manifest media type",
        ),
        ({**image(), "layers": [{"digest": "sha256:bad", "size": 1}]}, None, None, None, "malformed"),
        ({**image(), "layers": [{"digest": D1, "size": -1}]}, None, None, None, "malformed"),
        ({**image(), "config": "x"}, None, None, None, "malformed"),
    ],
)
def test_parse_manifest(
    doc: object, content_type: str | None, expected_type: str | None, children: list[str] | None, error: str | None
) -> None:
    data = json.dumps(doc).encode()
    if error:
        with pytest.raises(ManifestInvalid, match=error):
            parse_manifest(data, content_type)
        return
    parsed = parse_manifest(data, content_type)
    assert parsed.media_type == expected_type
    assert [str(c.digest) for c in parsed.children] == children


def test_not_json() -> None:
    with pytest.raises(ManifestInvalid, match="not JSON"):
        parse_manifest(b"\xff<html>", None)


def test_index_platforms_and_pick() -> None:
    parsed = parse_manifest(json.dumps(index()).encode(), None)
    assert [c.platform for c in parsed.children] == ["linux/arm64/v8", "linux/amd64"]
    chosen = pick_platform(parsed)
    assert chosen is not None and str(chosen.digest) == D2
    assert pick_platform(parsed, "windows/amd64") is None


def test_subject_is_parsed() -> None:
    doc = {**image(), "subject": {"mediaType": OCI_MANIFEST, "digest": D3, "size": 3}}
    parsed = parse_manifest(json.dumps(doc).encode(), None)
    assert parsed.subject is not None and str(parsed.subject) == D3


@pytest.mark.parametrize(
    ("header", "media_type", "ok"),
    [
        (None, OCI_INDEX, True),
        ("*/*", OCI_INDEX, True),
        (f"{OCI_MANIFEST}, {DOCKER_MANIFEST}", OCI_INDEX, False),
        (f"{OCI_MANIFEST};q=0.5, {OCI_INDEX}", OCI_INDEX, True),
        (DOCKER_MANIFEST, DOCKER_MANIFEST, True),
    ],
)
def test_accept(header: str | None, media_type: str, ok: bool) -> None:
    assert acceptable(media_type, parse_accept(header)) is ok
