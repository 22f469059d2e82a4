"""Glob matching: '*' within a segment, '**' across segments."""

from __future__ import annotations

import pytest

from proxy.oci.globs import GlobSet


@pytest.mark.parametrize(
    ("patterns", "text", "expected"),
    [
        (["docker.io/library/*"], "docker.io/library/nginx", True),
        (["docker.io/library/nginx"], "docker.io/library/nginx\n", False),
        (["docker.io/library/*"], "docker.io/library/a/b", False),
        (["docker.io/library/*"], "docker.io/library", False),
        (["ghcr.io/acme/**"], "ghcr.io/acme/app", True),
        (["ghcr.io/acme/**"], "ghcr.io/acme/team/app", True),
        (["ghcr.io/acme/**"], "ghcr.io/acme", False),
        (["ghcr.io/acme/**"], "ghcr.io/acmecorp/app", False),
        (["a/**/b"], "a/b", True),
        (["a/**/b"], "a/x/y/b", True),
        (["a/**/b"], "a/x/y/c", False),
        (["**/nginx"], "nginx", True),
        (["**/nginx"], "docker.io/library/nginx", True),
        (["**"], "anything/at/all", True),
        (["*"], "one/two", False),
        (["payments-*"], "payments-eu", True),
        (["payments-*"], "payments", False),
        (["*.acme.example"], "registry.acme.example", True),
        (["registry.acme.example"], "registryXacme.example", False),  # '.' is literal
        (["a+b(c)"], "a+b(c)", True),  # regex characters are literal
        (["x", "y"], "y", True),
        ([], "x", False),
    ],
)
def test_match(patterns: list[str], text: str, expected: bool) -> None:
    assert GlobSet.compile(patterns).match(text) is expected


def test_empty_set_is_falsy() -> None:
    assert not GlobSet.compile([])
    assert GlobSet.compile(["*"])
