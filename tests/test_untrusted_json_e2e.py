"""Deeply nested JSON from a real upstream (issue 13 finding 5): Distribution accepts a
manifest with an unknown field nested 9,990 levels deep (Go's decoder stops at 10,000;
Python's recursion limit is 1,000). The mirror answers a spec ``MANIFEST_INVALID`` error
for it, ``/mutate`` and ``/validate`` a proper AdmissionReview denial, ``warm`` a reported
failure — never a 500, and the daemon keeps serving."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.settings import AdmissionConfig, CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.http.app import create_app
from proxy.inventory.warm import Warmer, open_mirror
from proxy.ops.progress import Progress
from tests.support.aio import ServerFactory
from tests.support.images import OCI_MANIFEST, ImageFactory
from tests.support.procs import free_port
from tests.support.registry import Registry

DATA = Path(__file__).parent / "data" / "admission"
DEPTH = 9_990
POLICY = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {{name: pinned}}
spec:
  mode: enforce
  match: {{images: ["docker.io/{repo}"]}}
  rules: {{requireDigest: true, resolveTags: true, image: {{maxLayers: 10}}}}
"""


async def push_deep_manifest(registry: Registry, image_factory: ImageFactory, repo: str) -> str:
    """Push an image, then the same manifest with ``"x": [[[…]]]`` under the tag ``deep``
    (raw bytes through the registry API, as any client may push them)."""
    image = image_factory.image("1", layers=[1_000])
    await registry.apush(image.layout, "1", f"{repo}:1")
    body = image.manifest_bytes.rstrip()[:-1] + b', "x": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    async with aiohttp.ClientSession() as session, session.put(
        f"{registry.url}/v2/{repo}/manifests/deep", data=body, headers={"Content-Type": OCI_MANIFEST}
    ) as response:
        assert response.status == 201, await response.text()
        return response.headers["Docker-Content-Digest"]


def pod_review(image: str) -> dict[str, Any]:
    review: dict[str, Any] = copy.deepcopy(json.loads((DATA / "pod-create.json").read_text()))
    spec = review["request"]["object"]["spec"]
    spec["containers"] = [{**spec["containers"][0], "image": image}]
    del spec["initContainers"], spec["volumes"]
    return review


@pytest.fixture
def config(registry: Registry, repo: str, tmp_path: Path) -> Config:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "pinned.yaml").write_text(POLICY.format(repo=repo))
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        timeouts=TimeoutConfig(connect=5, read=30, manifest=10, retries=0, backoff=0.05),
        admission=AdmissionConfig(enabled=True, listen=("127.0.0.1", free_port())),
        policies=policies,
    )


async def test_deep_upstream_manifest_is_manifest_invalid_everywhere(
    registry: Registry, aiohttp_server: ServerFactory, image_factory: ImageFactory, repo: str, config: Config
) -> None:
    digest = await push_deep_manifest(registry, image_factory, repo)
    server = await aiohttp_server(create_app(config))
    mirror = f"http://{server.host}:{server.port}"
    webhook = f"http://127.0.0.1:{config.admission.listen[1]}"
    async with aiohttp.ClientSession() as session:
        for reference in ("deep", digest):
            for method in ("GET", "HEAD"):
                async with session.request(method, f"{mirror}/v2/{repo}/manifests/{reference}") as response:
                    assert response.status == 502, (method, reference, await response.text())
                    if method == "GET":
                        error = (await response.json())["errors"][0]
                        assert error["code"] == "MANIFEST_INVALID"
                        assert "manifest nests deeper than 64 levels" in error["message"]
        for endpoint in ("mutate", "validate"):
            review = pod_review(f"docker.io/{repo}:deep")
            async with session.post(f"{webhook}/{endpoint}", json=review) as response:
                assert response.status == 200, await response.text()
                answer = (await response.json())["response"]
            assert answer["uid"] == review["request"]["uid"] and answer["allowed"] is False
            assert "nests deeper than 64 levels" in answer["status"]["message"], answer
        # The daemon still serves the sound tag.
        async with session.get(f"{mirror}/v2/{repo}/manifests/1") as response:
            assert response.status == 200


async def test_warm_reports_a_deep_manifest(
    registry: Registry, image_factory: ImageFactory, repo: str, config: Config
) -> None:
    await push_deep_manifest(registry, image_factory, repo)
    mirror = await open_mirror(config)
    try:
        (result,) = await Warmer(mirror, Progress(io.StringIO(), tty=False)).run([f"{repo}:deep"])
    finally:
        await mirror.close()
    assert result.error is not None and "manifest nests deeper than 64 levels" in result.error
