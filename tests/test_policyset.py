"""Policy sets: loading a directory, reload on change, last good set kept on errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from proxy.oci.reference import ImageReference
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicySet, PolicyStore, load_policies
from proxy.policy.document import PolicyInvalid
from tests.support.polling import eventually

POLICY = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: {name}}}
spec:
  match: {{images: ["**"]}}
  rules: {rules}
"""


def write(path: Path, name: str = "p", rules: str = "{}") -> Path:
    path.write_text(POLICY.format(name=name, rules=rules))
    # mtime granularity can be coarse: make every rewrite visible to the poller
    stamp = path.stat().st_mtime_ns + 10_000_000 * (1 + len(rules))
    os.utime(path, ns=(stamp, stamp))
    return path


def test_load_directory(data_dir: Path) -> None:
    policies = load_policies(data_dir / "policies/valid")
    # sorted by file name; dot files and other suffixes skipped; empty documents ignored
    assert [p.name for p in policies.policies] == ["registries", "no-latest", "prod-pinned"]
    assert [f.name for f in policies.files] == ["multi.yml", "pinned.yaml"]


def test_load_single_file(data_dir: Path) -> None:
    policies = load_policies(data_dir / "policies/valid/pinned.yaml")
    assert [p.name for p in policies.policies] == ["prod-pinned"]


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            {"a.yaml": "a", "b.yaml": "a"},
            "b.yaml: document 1 (a): metadata.name: policy 'a' is already defined in {dir}/a.yaml: document 1 (a)",
        ),
        ({}, None),
    ],
)
def test_duplicates(tmp_path: Path, files: dict[str, str], error: str | None) -> None:
    for file, name in files.items():
        write(tmp_path / file, name)
    if error is None:
        assert load_policies(tmp_path).policies == ()
        return
    with pytest.raises(PolicyInvalid) as info:
        load_policies(tmp_path)
    assert error.format(dir=tmp_path) in info.value.message


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid, match="no such policy file or directory"):
        load_policies(tmp_path / "missing")


@pytest.mark.parametrize(
    ("image", "canonical"),
    [
        ("mirror:5000/docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("mirror:5000/ghcr.io/acme/app@sha256:" + "a" * 64, "ghcr.io/acme/app@sha256:" + "a" * 64),
        ("mirror:5000/acme/app:1", "mirror:5000/acme/app:1"),  # 'acme' is no registry host
        ("other:5000/ghcr.io/acme/app:1", "other:5000/ghcr.io/acme/app:1"),
    ],
)
def test_canonical(tmp_path: Path, image: str, canonical: str) -> None:
    write(tmp_path / "p.yaml", rules='{rewriteRegistry: "mirror:5000"}')
    policies = load_policies(tmp_path)
    assert str(policies.canonical(ImageReference.parse(image))) == canonical


def store(path: Path | None) -> tuple[PolicyStore, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return PolicyStore(path, metrics, structlog.get_logger(), interval=0.01), metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


async def test_store_reloads_and_keeps_last_good(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "first")
    policy_store, metrics = store(tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with policy_store.running():
            assert policy_store.ready
            assert [p.name for p in policy_store.current.policies] == ["first"]  # type: ignore[union-attr]
            write(tmp_path / "b.yaml", "second")
            await eventually(lambda: len(policy_store.current.policies) == 2)  # type: ignore[union-attr]
            # an invalid file: error kept, last good set stays active
            (tmp_path / "c.yaml").write_text("kind: [")
            await eventually(lambda: policy_store.error is not None)
            assert "c.yaml: invalid YAML" in (policy_store.error or "")
            assert len(policy_store.current.policies) == 2  # type: ignore[union-attr]
            # fixed again
            (tmp_path / "c.yaml").unlink()
            await eventually(lambda: policy_store.error is None)
    assert sample(metrics, "pullgate_policy_reloads_total", result="ok") == 3
    assert sample(metrics, "pullgate_policy_reloads_total", result="error") == 1
    assert sample(metrics, "pullgate_policies_loaded") == 2
    events = [e["event"] for e in logs]
    assert events == ["policies_loaded", "policies_loaded", "policies_invalid", "policies_loaded"]
    invalid = next(e for e in logs if e["event"] == "policies_invalid")
    assert invalid["keeping"] == 2 and invalid["log_level"] == "error"


async def test_store_not_ready_until_valid(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: [")
    policy_store, _ = store(tmp_path)
    async with policy_store.running():
        assert not policy_store.ready and "invalid YAML" in (policy_store.error or "")
        write(tmp_path / "a.yaml", "fixed")
        await eventually(lambda: policy_store.ready)


async def test_store_without_path_is_ready_and_empty() -> None:
    policy_store, _ = store(None)
    async with policy_store.running():
        assert policy_store.current == PolicySet()


async def test_store_configmap_symlink_swap(tmp_path: Path) -> None:
    """A ConfigMap volume: files are symlinks into a '..data' dir that is swapped atomically."""
    first, second = tmp_path / "..2024_01", tmp_path / "..2024_02"
    first.mkdir(), second.mkdir()
    write(first / "p.yaml", "one")
    write(second / "p.yaml", "two")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "p.yaml").symlink_to("..data/p.yaml")
    policy_store, _ = store(tmp_path)
    async with policy_store.running():
        assert [p.name for p in policy_store.current.policies] == ["one"]  # type: ignore[union-attr]
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        shutil.rmtree(first)
        await eventually(lambda: policy_store.current.policies[0].name == "two")  # type: ignore[union-attr]
