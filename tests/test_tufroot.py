"""The TUF refresh of the default Sigstore trusted root (``proxy.trust.tufroot`` and
``proxy.http.trustrefresh``) against a REAL TUF repository: generated with python-tuf's
metadata API (``tests/support/tufrepo.py``), served over loopback by aiohttp, read by
python-tuf's ngclient in a thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from proxy.config.settings import load_config
from proxy.errors import ConfigError
from proxy.http.app import create_app
from proxy.http.appkeys import METRICS, TRUST_ROOTS
from proxy.http.trustrefresh import TrustRootRefresher
from proxy.ops.metrics import Metrics
from proxy.policy.document import parse_policy
from proxy.policy.rules.signature import Signatures
from proxy.trust.trustroot import DEFAULT_NAME, RootHolder, TrustedRoot, default_trusted_root
from proxy.trust.tufroot import TARGET, TrustRootRefreshFailed, TufRootClient, load_anchor, shipped_tuf_root
from tests.support.tufrepo import TufRepository

ServerFactory = Callable[..., Awaitable[TestServer]]
SHIPPED = Path(__file__).parent.parent / "proxy" / "trust" / "data" / "trusted_root.json"


def private_root(variant: int) -> bytes:
    """The public-good root keeping only its Rekor log number ``variant - 1``: a different,
    still valid trusted root per variant, told apart by its one tlog."""
    doc = json.loads(SHIPPED.read_bytes())
    doc["tlogs"] = [doc["tlogs"][variant - 1]]
    return json.dumps(doc).encode()


def variant(root: TrustedRoot) -> int | None:
    """Which ``private_root`` ``root`` is (None: neither, e.g. the shipped root)."""
    for n in (1, 2):
        if root.tlogs.keys() == TrustedRoot.from_json(private_root(n), "").tlogs.keys():
            return n
    return None


@pytest.fixture
async def served(tmp_path: Path, aiohttp_server: ServerFactory) -> tuple[TufRepository, TestServer]:
    repo = TufRepository(tmp_path / "repo")
    app = web.Application()
    app.router.add_static("/", repo.directory)
    return repo, await aiohttp_server(app, host="127.0.0.1")


def client_for(server: TestServer, anchor: bytes, cache: Path) -> TufRootClient:
    return TufRootClient(str(server.make_url("")).rstrip("/"), anchor, cache, timeout=5)


def refresher(client: TufRootClient, roots: RootHolder | None = None) -> tuple[TrustRootRefresher, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return TrustRootRefresher(client, roots or RootHolder(), metrics, structlog.get_logger("test"), 3600), metrics


async def test_refresh_installs_the_signed_trusted_root(served: tuple[TufRepository, TestServer], tmp_path: Path):
    repo, server = served
    repo.publish(TARGET, private_root(1))
    task, metrics = refresher(client_for(server, repo.root_json, tmp_path / "cache"))
    assert variant(task.roots.current) is None
    with capture_logs() as logs:
        assert await task.refresh()
    assert variant(task.roots.current) == 1
    assert task.roots.current.name == f"{TARGET} from {task.client.url} (TUF)"
    assert [e["event"] for e in logs] == ["trusted_root_refreshed"]
    assert metrics.registry.get_sample_value("pullgate_trusted_root_last_refresh_timestamp_seconds") > 0
    assert metrics.registry.get_sample_value("pullgate_trusted_root_refreshes_total", {"result": "ok"}) == 1

    repo.publish(TARGET, private_root(2))  # the repository moves on: the next refresh follows
    assert await task.refresh()
    assert variant(task.roots.current) == 2


def _tampered(repo: TufRepository) -> None:
    signed = private_root(2)
    repo.publish(TARGET, signed)
    forged = signed.replace(b"rekor.sigstore.dev", b"rekor.attacker.xyz")  # same length, other bytes
    assert len(forged) == len(signed) != forged
    repo.write_target(TARGET, forged)  # served, but not what targets.json signs


def _longer(repo: TufRepository) -> None:
    repo.publish(TARGET, private_root(2))
    repo.write_target(TARGET, private_root(2) + b" " * 64)  # past the signed length: refused while reading


def _expired_timestamp(repo: TufRepository) -> None:
    repo.publish(TARGET, private_root(2), timestamp_expires=datetime.now(UTC) - timedelta(minutes=1))


def _not_a_trusted_root(repo: TufRepository) -> None:
    repo.publish(TARGET, b'{"mediaType": "text/plain"}')


def _unsigned_root_rotation(repo: TufRepository) -> None:
    # root v2 that only the NEW root key signed: a repository (or attacker) replacing the
    # root keys without the old ones' consent
    repo.rotate("root")
    path = repo.directory / "2.root.json"
    doc = json.loads(path.read_bytes())
    doc["signatures"] = [s for s in doc["signatures"] if s["keyid"] == repo.signers["root"].public_key.keyid]
    path.write_text(json.dumps(doc))


def _other_target_only(repo: TufRepository) -> None:
    # a fresh repository state whose targets no longer list trusted_root.json
    repo.targets.signed.targets.clear()
    repo.publish("signing_config.json", b"{}")
    del repo.targets.signed.targets["signing_config.json"]
    repo.publish("other.json", b"{}")


@pytest.mark.parametrize(
    ("attack", "error"),
    [
        (_tampered, "LengthOrHashMismatchError"),
        (_longer, "DownloadLengthMismatchError"),
        (_expired_timestamp, "ExpiredMetadataError"),
        (_not_a_trusted_root, "is not a Sigstore trusted root"),
        (_unsigned_root_rotation, "UnsignedMetadataError"),
    ],
    ids=[
        "target-hash-mismatch",
        "target-longer-than-signed",
        "expired-timestamp",
        "not-a-trusted-root",
        "root-rotation-unsigned-by-old-keys",
    ],
)
async def test_a_bad_repository_state_is_refused_and_the_last_good_root_kept(
    served: tuple[TufRepository, TestServer],
    tmp_path: Path,
    attack: Callable[[TufRepository], None],
    error: str,
):
    repo, server = served
    repo.publish(TARGET, private_root(1))
    task, metrics = refresher(client_for(server, repo.root_json, tmp_path / "cache"))
    assert await task.refresh()
    good = task.roots.current
    attack(repo)
    with capture_logs() as logs:
        assert not await task.refresh()
    assert task.roots.current is good
    (event,) = logs
    assert event["event"] == "trusted_root_refresh_failed"
    assert error in event["error"], event["error"]
    assert event["keeping"] == good.name
    assert metrics.registry.get_sample_value("pullgate_trusted_root_refreshes_total", {"result": "failed"}) == 1


async def test_the_old_root_key_can_rotate_to_a_new_one(served: tuple[TufRepository, TestServer], tmp_path: Path):
    repo, server = served
    anchor = repo.root_json
    repo.rotate("root")
    repo.rotate("timestamp")  # root v3: signed by v2's root key (unchanged), with a new timestamp key
    repo.publish(TARGET, private_root(1))
    task, _ = refresher(client_for(server, anchor, tmp_path / "cache"))
    assert await task.refresh()
    assert variant(task.roots.current) == 1


@pytest.mark.parametrize(
    ("anchor", "error"),
    [
        ("another-repository", "UnsignedMetadataError"),
        # Sigstore's real root v15 (expired 2026-11-20): our repository has no 16.root.json to
        # rotate to, so the client stops at v15 and refuses to go on with an expired root
        ("sigstore-shipped", "ExpiredMetadataError"),
    ],
)
async def test_a_client_anchored_on_another_root_refuses_the_repository(
    served: tuple[TufRepository, TestServer], tmp_path: Path, anchor: str, error: str
):
    repo, server = served
    repo.publish(TARGET, private_root(1))
    other = TufRepository(tmp_path / "other").root_json if anchor == "another-repository" else shipped_tuf_root()
    client = client_for(server, other, tmp_path / "cache")
    with pytest.raises(TrustRootRefreshFailed) as caught:
        await asyncio.to_thread(client.fetch)  # off the loop: the loop serves the repository
    assert error in caught.value.message
    task, _ = refresher(client)
    assert not await task.refresh()
    assert task.roots.current.name == DEFAULT_NAME


async def test_offline_keeps_the_last_good_root_and_a_restart_uses_the_cached_one(
    served: tuple[TufRepository, TestServer], tmp_path: Path
):
    repo, server = served
    repo.publish(TARGET, private_root(1))
    client = client_for(server, repo.root_json, tmp_path / "cache")
    task, _ = refresher(client)
    assert await task.refresh()
    url = str(server.make_url("")).rstrip("/")
    await server.close()  # the network goes away

    with capture_logs() as logs:
        assert not await task.refresh()
    assert logs[0]["event"] == "trusted_root_refresh_failed"
    assert logs[0]["error"].startswith(task.client.url)
    assert variant(task.roots.current) == 1

    restarted, _ = refresher(TufRootClient(url, repo.root_json, tmp_path / "cache", timeout=5))  # a new process
    assert restarted.roots.current.name == DEFAULT_NAME
    with capture_logs() as logs:
        assert await restarted.load_cached()
        assert not await restarted.refresh()
    assert [e["event"] for e in logs] == ["trusted_root_cache_loaded", "trusted_root_refresh_failed"]
    assert variant(restarted.roots.current) == 1


def _swap_cached_target(cache: Path) -> None:
    (cache / "targets" / TARGET).write_bytes(private_root(2))  # fetched was private_root(1)


def _forge_cached_timestamp(cache: Path) -> None:
    path = cache / "metadata" / "timestamp.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["version"] += 1  # the signature no longer covers it
    path.write_text(json.dumps(doc))


def _cached_root_from_another_anchor(cache: Path) -> None:
    pass  # the restart below uses another anchor


@pytest.mark.parametrize(
    ("tamper", "other_anchor", "error"),
    [
        (_swap_cached_target, False, "LengthOrHashMismatchError"),
        (_forge_cached_timestamp, False, "UnsignedMetadataError"),
        (_cached_root_from_another_anchor, True, "UnsignedMetadataError"),
    ],
    ids=["target-swapped-on-disk", "timestamp-edited-on-disk", "restart-with-another-anchor"],
)
async def test_a_cache_that_no_longer_verifies_is_not_used(
    served: tuple[TufRepository, TestServer],
    tmp_path: Path,
    tamper: Callable[[Path], None],
    other_anchor: bool,
    error: str,
):
    repo, server = served
    repo.publish(TARGET, private_root(1))
    cache = tmp_path / "cache"
    task, _ = refresher(client_for(server, repo.root_json, cache))
    assert await task.refresh()
    tamper(cache)
    anchor = TufRepository(tmp_path / "other").root_json if other_anchor else repo.root_json
    restarted, _ = refresher(client_for(server, anchor, cache))
    with capture_logs() as logs:
        assert not await restarted.load_cached()
    assert logs[0]["event"] == "trusted_root_cache_invalid"
    assert error in logs[0]["error"], logs[0]["error"]
    assert restarted.roots.current.name == DEFAULT_NAME


async def test_nothing_cached_yet_is_not_an_error(tmp_path: Path):
    client = TufRootClient("http://127.0.0.1:9", shipped_tuf_root(), tmp_path / "cache", timeout=1)
    assert client.cached() is None


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "cannot read"),
        (b"{}", "is not a TUF root.json"),
        (b"not json", "is not a TUF root.json"),
        ("tampered", "is not a TUF root.json"),
    ],
)
def test_a_bad_anchor_file_names_the_key(tmp_path: Path, content: bytes | str | None, error: str):
    path = tmp_path / "root.json"
    if content == "tampered":  # Sigstore's root with its version changed: its signatures no longer hold
        doc = json.loads(shipped_tuf_root())
        doc["signed"]["version"] += 1
        path.write_text(json.dumps(doc))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_anchor(path)
    assert caught.value.message.startswith("trust.tuf.root: ")
    assert error in caught.value.message


def test_the_shipped_anchor_is_sigstores_self_signed_root():
    assert load_anchor(None) == shipped_tuf_root()
    doc = json.loads(shipped_tuf_root())
    assert doc["signed"]["_type"] == "root" and doc["signed"]["roles"]["root"]["threshold"] == 3
    load_anchor(Path(__file__).parent.parent / "proxy" / "trust" / "data" / "sigstore-tuf-root.json")


def test_keyless_rules_without_a_trusted_root_read_the_holder_at_verification_time():
    roots = RootHolder()
    doc = {
        "apiVersion": "pullgate.dev/v1",
        "kind": "ImagePolicy",
        "metadata": {"name": "keyless"},
        "spec": {
            "match": {"images": ["**"]},
            "rules": {"signatures": {"keyless": [{"issuer": "https://accounts.google.com", "subject": "a@b.c"}]}},
        },
    }
    (rule,) = parse_policy(doc, roots=roots).rules
    assert isinstance(rule, Signatures)
    assert rule.policy.root() is roots.current
    refreshed = default_trusted_root()
    roots.replace(refreshed)
    assert rule.policy.root() is refreshed


async def test_the_app_refreshes_through_the_configured_repository(
    served: tuple[TufRepository, TestServer], tmp_path: Path, aiohttp_client: Callable[..., Awaitable[object]]
):
    repo, server = served
    repo.publish(TARGET, private_root(1))
    anchor = tmp_path / "tuf-root.json"
    anchor.write_bytes(repo.root_json)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"cache: {{dir: {tmp_path / 'cache'}}}\n"
        f"trust: {{tuf: {{url: '{str(server.make_url('')).rstrip('/')}', root: {anchor}, interval: 1h}}}}\n"
    )
    app = create_app(load_config(config_file, {}))
    await aiohttp_client(app)
    for _ in range(100):
        if variant(app[TRUST_ROOTS].current) == 1:
            break
        await asyncio.sleep(0.05)
    assert variant(app[TRUST_ROOTS].current) == 1
    assert app[METRICS].registry.get_sample_value("pullgate_trusted_root_last_refresh_timestamp_seconds") > 0
    assert (tmp_path / "cache" / "tuf" / "targets" / TARGET).exists()


def test_the_app_refuses_a_bad_anchor_at_startup(tmp_path: Path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"cache: {{dir: {tmp_path / 'cache'}}}\n"
        f"trust: {{tuf: {{url: 'http://127.0.0.1:9', root: {tmp_path / 'missing.json'}}}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        create_app(load_config(config_file, {}))
    assert caught.value.message.startswith("trust.tuf.root: ")
