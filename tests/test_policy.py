"""ImagePolicy parsing and loading: strict validation whose errors name file, document and
field; image-pattern normalisation; matching."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.oci.reference import ImageReference
from proxy.policy.document import Policy, PolicyInvalid, load_file, parse_policy
from proxy.policy.fields import FieldError

BASE = """
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: p}
spec:
  match: {images: ["**"]}
"""


def doc(**changes: Any) -> dict[str, Any]:
    """The base document with dotted-path keys replaced (``None`` deletes)."""
    data: dict[str, Any] = yaml.safe_load(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({}, None),
        ({"apiVersion": "pullgate.dev/v2"}, "apiVersion: expected pullgate.dev/v1"),
        ({"kind": "Policy"}, "kind: expected ImagePolicy"),
        ({"extra": 1}, "(document).extra: unknown field"),
        ({"metadata": None}, "metadata.name: expected a non-empty string, got null"),
        ({"metadata__name": "Prod_Pinned"}, "metadata.name: must be lowercase"),
        ({"metadata__name": "x" * 64}, "metadata.name: must be lowercase"),
        ({"metadata__namespace": "x"}, "metadata.namespace: unknown field"),
        ({"spec": None}, "spec: required"),
        ({"spec": []}, "spec: expected a mapping, got a list"),
        ({"spec__mode": "block"}, "spec.mode: must be one of enforce | warn | audit"),
        ({"spec__match": None}, "spec.match.images: required"),
        ({"spec__match__images": []}, "spec.match.images: must name at least one"),
        ({"spec__match__images": "**"}, "spec.match.images: expected a list of strings"),
        ({"spec__match__images": ["ok/*", 3]}, "spec.match.images[1]: expected a non-empty"),
        ({"spec__match__images": ["nginx:1.25"]}, "spec.match.images[0]: patterns name repos"),
        ({"spec__match__images": ["x@sha256:abc"]}, "spec.match.images[0]: patterns name"),
        ({"spec__match__excludeImages": [""]}, "spec.match.excludeImages[0]: expected a non-"),
        ({"spec__match__namespaces": "prod"}, "spec.match.namespaces: expected a list"),
        ({"spec__match__tags": []}, "spec.match.tags: unknown field (allowed: excludeImages"),
        ({"spec__rules__requireDigest": "yes"}, "spec.rules.requireDigest: expected true or"),
        ({"spec__rules__resolveTags": 1}, "spec.rules.resolveTags: expected true or false"),
        ({"spec__rules__denyTags": "latest"}, "spec.rules.denyTags: expected a list"),
        ({"spec__rules__denyTags": ["a:b"]}, "spec.rules.denyTags[0]: expected a tag"),
        ({"spec__rules__allowedRegistries": ["ghcr.io/acme"]}, "allowedRegistries[0]: expected"),
        ({"spec__rules__rewriteRegistry": "not a host"}, "spec.rules.rewriteRegistry: expected"),
        ({"spec__rules__notarize": {}}, "spec.rules.notarize: unknown field (allowed: "),
    ],
)
def test_parse_policy(changes: dict[str, Any], error: str | None) -> None:
    if error is None:
        assert parse_policy(doc(**changes)).name == "p"
        return
    with pytest.raises(FieldError) as info:
        parse_policy(doc(**changes))
    assert error in info.value.message


def test_defaults() -> None:
    policy = parse_policy(doc())
    assert (policy.mode, policy.rules, policy.resolve_tags, policy.rewrite_registry) == (
        "enforce",
        (),
        False,
        None,
    )
    assert policy.match.namespaces is None


def test_rules_built_in_order() -> None:
    policy = parse_policy(
        doc(
            spec__rules={
                "denyTags": ["latest"],
                "requireDigest": True,
                "allowedRegistries": ["ghcr.io"],
            }
        )
    )
    assert [r.name for r in policy.rules] == ["requireDigest", "allowedRegistries", "denyTags"]
    # resolveTags without requireDigest reports pinning failures itself
    policy = parse_policy(doc(spec__rules={"resolveTags": True}))
    assert [r.name for r in policy.rules] == ["resolveTags"]
    # switched-off rules are not built
    assert parse_policy(doc(spec__rules={"requireDigest": False, "denyTags": []})).rules == ()


@pytest.mark.parametrize(
    ("images", "exclude", "namespaces", "image", "namespace", "expected"),
    [
        (["nginx"], [], None, "nginx", "x", True),  # normalised to docker.io/library/nginx
        (["nginx"], [], None, "docker.io/library/nginx:1", "x", True),
        (["nginx"], [], None, "index.docker.io/nginx@sha256:" + "a" * 64, "x", True),
        (["acme/*"], [], None, "acme/app:1", "x", True),  # docker.io/acme/*
        (["acme/*"], [], None, "ghcr.io/acme/app", "x", False),
        (["docker.io/library/*"], [], None, "busybox", "x", True),
        (["ghcr.io/acme/**"], [], None, "ghcr.io/acme/team/app:1", "x", True),
        (["ghcr.io/acme/**"], ["ghcr.io/acme/legacy/**"], None, "ghcr.io/acme/legacy/a", "x", False),
        (["localhost:5000/**"], [], None, "localhost:5000/x/y:1", "x", True),
        (["**"], [], ["prod", "payments-*"], "nginx", "payments-eu", True),
        (["**"], [], ["prod", "payments-*"], "nginx", "dev", False),
        (["**"], [], [], "nginx", "prod", False),  # an empty namespace list matches none
        (["*/library/*"], [], None, "nginx", "x", True),  # a leading glob is not normalised
    ],
)
def test_match(
    images: list[str],
    exclude: list[str],
    namespaces: list[str] | None,
    image: str,
    namespace: str,
    expected: bool,
) -> None:
    match: dict[str, Any] = {"images": images, "excludeImages": exclude}
    if namespaces is not None:
        match["namespaces"] = namespaces
    policy: Policy = parse_policy(doc(spec__match=match))
    assert policy.applies(ImageReference.parse(image), namespace) is expected


def test_load_file_multi_document(data_dir: Path) -> None:
    policies = load_file(data_dir / "policies/valid/multi.yml")
    assert [p.name for p in policies] == ["registries", "no-latest"]
    assert policies[1].source.endswith("multi.yml: document 2 (no-latest)")


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("bad.yaml", "a: [1\n", "bad.yaml: invalid YAML at line 2, column 1"),
        ("list.yaml", "- 1\n", "list.yaml: document 1: (document): expected a mapping"),
        ("bin.yaml", b"\xff\xfe", "bin.yaml: not UTF-8 text"),
        (
            "second.yaml",
            BASE + "---\n" + BASE.replace("name: p", "name: q") + "  rules: {denyTags: [1]}\n",
            "second.yaml: document 2 (q): spec.rules.denyTags[0]: expected a non-empty string",
        ),
    ],
)
def test_load_file_errors(tmp_path: Path, name: str, content: str | bytes, error: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(textwrap.dedent(content))
    with pytest.raises(PolicyInvalid) as info:
        load_file(path)
    assert f"{tmp_path}/{error}" in info.value.message


def test_load_file_names_document_and_field(data_dir: Path) -> None:
    with pytest.raises(PolicyInvalid) as info:
        load_file(data_dir / "policies/invalid/second-doc.yaml")
    assert info.value.message.endswith(
        "second-doc.yaml: document 2 (broken): spec.rules.denyTags: expected a list of strings, got a string"
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid, match="cannot read"):
        load_file(tmp_path / "nope.yaml")
