"""Shared fixtures: real upstream registries, a token issuer, containerd, image builders.

Real components are session-scoped (each starts in well under a second) and tests keep
out of each other's way with a unique repository name (``repo`` fixture). Any test that
uses one of them is marked ``e2e`` automatically: ``pytest -m "not e2e"`` runs the rest.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.images import ImageFactory
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

DATA_DIR = Path(__file__).parent / "data"
E2E_FIXTURES = frozenset({"registry", "auth_registry", "token_server", "containerd"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain (no auth) Distribution upstream on loopback."""
    with Registry(tmp_path_factory.mktemp("registry")) as upstream:
        yield upstream


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    """Token issuer with one user (``token_server.creds``); anonymous gets no access."""
    with TokenServer() as server:
        yield server


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory,
                  token_server: TokenServer) -> Iterator[Registry]:
    """A Distribution upstream that demands ``token_server``'s bearer tokens."""
    with Registry(tmp_path_factory.mktemp("auth-registry"),
                  token_server=token_server) as upstream:
        yield upstream


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root: run the e2e tests as root (CI does)")
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


@pytest.fixture
def image_factory(tmp_path: Path) -> ImageFactory:
    """Builds OCI layouts under the test's tmp dir: ``image_factory.image(layers=[...])``."""
    return ImageFactory(tmp_path / "layouts")


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses, e.g. ``library/test-push-image-3f2a9c``."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") or "test"
    return f"library/{slug}-{secrets.token_hex(3)}"
