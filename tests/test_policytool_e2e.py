"""``pullgate policy check`` as a process: what an offline run could not evaluate is said to
be not evaluated (never "passed", never denied for it), and the same manifests checked with
``--config`` against the real registry get the verdicts the webhook would give."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tests.support.images import ImageFactory
from tests.support.procs import run
from tests.support.registry import Registry

POLICIES = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: pinned}
spec:
  match: {images: ["docker.io/**"]}
  rules: {requireDigest: true, resolveTags: true}
---
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: hygiene}
spec:
  match: {images: ["docker.io/**"]}
  rules:
    image: {maxLayers: 5}
---
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: registries}
spec:
  match: {images: ["**"]}
  rules: {allowedRegistries: [docker.io]}
"""


def test_offline_check_says_not_evaluated_and_config_check_judges(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    image = image_factory.image("1", layers=[1_000])
    registry.push(image.layout, "1", f"{repo}:1")
    (tmp_path / "policies.yaml").write_text(POLICIES)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "prod"},
        "spec": {"containers": [{"name": "real", "image": f"{repo}:1"}, {"name": "ghost", "image": "nosuch/thing:9"}]},
    }
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    check = [sys.executable, "-m", "proxy", "policy", "check", "--policies", str(tmp_path / "policies.yaml")]

    offline = run([*check, str(tmp_path / "pod.yaml")], timeout=60, check=False)
    assert offline.returncode == 0, offline.stderr
    ghost = [line for line in offline.stdout.splitlines() if '"nosuch/thing:9"' in line]
    assert [line.split()[0] for line in ghost] == ["SKIP", "SKIP", "ALLOW"]
    assert "policy pinned not evaluated offline: tag resolution (resolveTags)" in ghost[0]
    assert "policy hygiene not evaluated offline: image rules" in ghost[1]
    assert "policy registries passed" in ghost[2], "what was evaluated offline still passes"
    assert "4 not evaluated offline (use --config or --cache-dir)" in offline.stdout.splitlines()[-1]

    config = tmp_path / "pullgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {"cache": {"dir": str(tmp_path / "cache")}, "upstreams": [{"name": "docker.io", "url": registry.url}]}
        )
    )
    online = run([*check, "--config", str(config), str(tmp_path / "pod.yaml")], timeout=60, check=False)
    assert online.returncode == 1, online.stdout + online.stderr
    lines = online.stdout.splitlines()
    assert not any(line.startswith("SKIP") for line in lines)
    assert any(line.startswith("DENY") and '"nosuch/thing:9"' in line and "policy pinned" in line for line in lines)
    assert any(line.startswith("ALLOW") and f'"{repo}:1"' in line and "policy hygiene passed" in line for line in lines)
