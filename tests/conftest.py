"""Shared fixtures: real upstream registries, a token issuer, containerd, image builders,
and the scale-out engines (Redis, SeaweedFS, Ceph RGW).

Real components are session-scoped (most start in well under a second; SeaweedFS ~3 s and
Ceph RGW ~2 s, once per session) and tests keep out of each other's way with a unique
repository name (``repo`` fixture) or key prefix (``key_prefix``). Any test that uses one
of them is marked ``e2e`` automatically: ``pytest -m "not e2e"`` runs the rest.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.config.settings import Config
from proxy.http.app import create_app
from tests.support import hangs
from tests.support.aio import ClientFactory, ServerFactory
from tests.support.containerd import Containerd
from tests.support.images import ImageFactory
from tests.support.origin import MirrorUnderTest, Origin, StartMirror
from tests.support.radosgw import RadosGateway
from tests.support.radosgw import missing as radosgw_missing
from tests.support.redis_server import RedisServer
from tests.support.redis_server import missing as redis_missing
from tests.support.registry import Registry
from tests.support.s3engine import S3Engine
from tests.support.seaweedfs import SeaweedFS
from tests.support.seaweedfs import missing as seaweedfs_missing
from tests.support.tokenserver import TokenServer

DATA_DIR = Path(__file__).parent / "data"
E2E_FIXTURES = frozenset({
    "registry", "auth_registry", "token_server", "containerd",
    "redis_server", "s3_engine", "seaweedfs_engine", "radosgw_engine",
})  # fmt: skip
S3_ENGINES = ("seaweedfs", "radosgw")
S3_BUCKET = "pullgate-test"

# --- log scan: no configured secret may appear in any test's output -------------------------
# Every test's captured output (structlog prints there unless a test captures it itself)
# is checked against the secrets configured so far: values of environment variables that a
# test sets (monkeypatch) with names like passwords, tokens or keys (upstream password_env,
# token signing keys), plus those registered through the ``secret`` fixture (client
# passwords, bearer tokens, the token issuer's password). The machine's own environment is
# left alone. Values shorter than MIN_SECRET_LENGTH are too likely to occur by chance.
MIN_SECRET_LENGTH = 8
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$", re.IGNORECASE)
_SECRETS = pytest.StashKey[set[str]]()
_START_ENV = pytest.StashKey[dict[str, str]]()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """A test past ``timeout`` fails with its asyncio tasks printed (``tests.support.hangs``)."""
    return hangs.set_timer(item, settings)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SECRETS] = set()
    config.stash[_START_ENV] = dict(os.environ)


def register_secret(config: pytest.Config, value: str) -> None:
    if len(value) >= MIN_SECRET_LENGTH:
        config.stash[_SECRETS].add(value)


@pytest.fixture
def secret(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``secret("hunter2-passphrase")``: the value is scanned for in every later test's
    output (the log scan fails a test whose output contains it); returns the value."""

    def register(value: str) -> str:
        register_secret(request.config, value)
        return value

    return register


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    start = item.config.stash[_START_ENV]
    for name, value in os.environ.items():  # the test's monkeypatched environment is still set
        if _SECRET_NAME.search(name) and start.get(name) != value:
            register_secret(item.config, value)
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    output = "\n".join(
        text for title, text in report.sections if title.startswith("Captured") and title.endswith(call.when)
    )
    leaked = sorted(s for s in item.config.stash[_SECRETS] if s in output)
    if leaked and report.passed:
        report.outcome = "failed"
        hints = ", ".join(f"{s[:2]}…({len(s)} chars)" for s in leaked)
        report.longrepr = f"log scan: configured secret(s) {hints} appear in the {call.when} output of {item.nodeid}"


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
def token_server(request: pytest.FixtureRequest) -> Iterator[TokenServer]:
    """Token issuer with one user (``token_server.creds``); anonymous gets no access."""
    with TokenServer() as server:
        register_secret(request.config, server.creds[1])
        yield server


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[Registry]:
    """A Distribution upstream that demands ``token_server``'s bearer tokens."""
    with Registry(tmp_path_factory.mktemp("auth-registry"), token_server=token_server) as upstream:
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


@pytest.fixture
async def origin(aiohttp_server: ServerFactory) -> tuple[Origin, TestServer]:
    """The registry-shaped fault-knob app (``tests/support/origin.py``) on loopback."""
    state = Origin()
    return state, await aiohttp_server(state.app())


@pytest.fixture
def origin_url(origin: tuple[Origin, TestServer]) -> str:
    """The ``origin`` app's base URL, for an upstream's ``url``."""
    return str(origin[1].make_url("")).rstrip("/")


@pytest.fixture
def start_mirror(origin: tuple[Origin, TestServer], aiohttp_client: ClientFactory) -> StartMirror:
    """``await start_mirror(config)``: the mirror app for ``config`` (whose upstream is
    ``origin_url``) under a test client, with the origin's fault knobs beside it."""

    async def start(config: Config) -> MirrorUnderTest:
        return await aiohttp_client(create_app(config)), origin[0]

    return start


# --- scale-out engines (issue 17): real Redis and two real S3 implementations ----------------
# Session-scoped like the registry. A missing engine FAILS the tests that need it (never a
# silent skip): .ci/run installs all of them.
def _require(engine: str, reason: str | None) -> None:
    if reason is not None:
        pytest.fail(f"{engine}: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _require("Redis", redis_missing())
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def seaweedfs_engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[SeaweedFS]:
    _require("SeaweedFS", seaweedfs_missing())
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as engine:
        register_secret(request.config, engine.keys.secret_key)
        engine.create_bucket(S3_BUCKET)
        yield engine


@pytest.fixture(scope="session")
def radosgw_engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[RadosGateway]:
    _require("Ceph RADOS Gateway", radosgw_missing())
    with RadosGateway(tmp_path_factory.mktemp("radosgw")) as engine:
        register_secret(request.config, engine.keys.secret_key)
        engine.create_bucket(S3_BUCKET)
        yield engine


@pytest.fixture(scope="session", params=S3_ENGINES)
def s3_engine(request: pytest.FixtureRequest) -> S3Engine:
    """Each real S3 engine in turn, with the bucket ``S3_BUCKET`` created; tests keep apart
    by key prefix (``key_prefix``)."""
    engine: S3Engine = request.getfixturevalue(f"{request.param}_engine")
    return engine


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses, e.g. ``t-concurrent-uploads-3f2a9c/``."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") or "test"
    return f"t-{slug}-{secrets.token_hex(3)}/"
