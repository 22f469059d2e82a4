"""What an operator reads from the real daemon (``python -m proxy serve``) in front of the
real registry (issue 15): SIGHUP names the keys that need a restart, ``cache_evicted`` names
the image, ``/metrics`` is on the mirror's port, and a lone upstream is the default."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import yaml

from tests.support.daemon import Daemon
from tests.support.images import ImageFactory
from tests.support.procs import free_port, http_status, wait_until
from tests.support.registry import Registry

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def pull(daemon: Daemon, repository: str, tag: str, ns: str | None = "docker.io") -> dict[str, object]:
    """Pull an image the way a client does: the manifest by tag, then its config and layers."""
    query = f"?ns={ns}" if ns else ""
    request = urllib.request.Request(
        daemon.url(f"/v2/{repository}/manifests/{tag}{query}"), headers={"Accept": _ACCEPT}
    )
    with _OPENER.open(request, timeout=30) as response:
        manifest: dict[str, object] = json.loads(response.read())
    for blob in [manifest["config"], *manifest["layers"]]:  # type: ignore[list-item]
        with _OPENER.open(daemon.url(f"/v2/{repository}/blobs/{blob['digest']}{query}"), timeout=30) as response:
            response.read()
    return manifest


def event(daemon: Daemon, name: str) -> dict[str, object]:
    assert daemon.proc is not None
    wait_until(
        lambda: any(e.get("event") == name for e in daemon.events()),
        timeout=15,
        what=f"{name} event",
        proc=daemon.proc,
        log=daemon.log,
    )
    return next(e for e in daemon.events() if e.get("event") == name)


def test_sighup_names_the_keys_that_need_a_restart(registry: Registry, tmp_path: Path) -> None:
    with Daemon(tmp_path, registry.url) as daemon:
        config = yaml.safe_load(daemon.config.read_text())
        config["cache"]["tag_ttl"] = "10m"
        config["log"]["level"] = "debug"  # applies live: not listed
        daemon.config.write_text(yaml.safe_dump(config))
        daemon.signal(signal.SIGHUP)
        needs_restart = event(daemon, "config_reload_needs_restart")
    assert needs_restart["keys"] == ["cache.tag_ttl"]


def test_cache_evicted_names_the_image(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    old = image_factory.image("1", layers=[60_000], seed="old")
    new = image_factory.image("1", layers=[60_000], seed="new")
    registry.push(old.layout, "1", f"{repo}-old:1")
    registry.push(new.layout, "1", f"{repo}-new:1")
    with Daemon(tmp_path, registry.url, cache={"dir": str(tmp_path / "cache"), "max_size": "100KB"}) as daemon:
        pull(daemon, f"{repo}-old", "1")
        pull(daemon, f"{repo}-new", "1")  # over the quota: the least recently pulled image goes
        evicted = event(daemon, "cache_evicted")
    assert evicted["images"] == [f"docker.io/{repo}-old:1"]
    assert evicted["root"] == old.manifest_digest


def test_metrics_are_on_the_mirror_port_not_the_webhook_port(registry: Registry, tmp_path: Path) -> None:
    webhook = free_port()
    admission = {"enabled": True, "listen": f"127.0.0.1:{webhook}"}
    with Daemon(tmp_path, registry.url, admission=admission) as daemon:
        wait_until(lambda: http_status(f"http://127.0.0.1:{webhook}/readyz") == 200, timeout=15, what="webhook")
        assert http_status(daemon.url("/metrics")) == 200
        assert http_status(f"http://127.0.0.1:{webhook}/metrics") == 404
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "`GET /metrics` (Prometheus) on the mirror's `listen` port" in readme


def test_a_lone_upstream_is_the_default(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    image = image_factory.image("1", layers=[1_000])
    registry.push(image.layout, "1", f"{repo}:1")
    with Daemon(tmp_path, registry.url, upstreams=[{"name": "ghcr.io", "url": registry.url}]) as daemon:
        manifest = pull(daemon, repo, "1", ns=None)  # no ns, no path prefix: default_upstream
    assert manifest["config"]["digest"] == image.config_digest  # type: ignore[index]
