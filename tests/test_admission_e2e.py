"""The webhook as the daemon runs it (shared process, cache and policy set), with the real
registry as upstream: tags are pinned to the digests the registry holds, and a tag that
moves upstream is followed once ``tag_ttl`` has passed."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.settings import AdmissionConfig, CacheConfig, Config, UpstreamConfig
from proxy.http.app import create_app
from tests.support.aio import ServerFactory
from tests.support.images import ImageFactory
from tests.support.procs import free_port
from tests.support.registry import Registry

DATA = Path(__file__).parent / "data" / "admission"
POLICY = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata:
  name: pin-{repo_slug}
spec:
  mode: enforce
  match:
    images: ["docker.io/{repo}"]
  rules:
    requireDigest: true
    resolveTags: true
"""


def deployment_review(image: str) -> dict[str, Any]:
    review: dict[str, Any] = json.loads((DATA / "deployment-create.json").read_text())
    review = copy.deepcopy(review)
    containers = review["request"]["object"]["spec"]["template"]["spec"]["containers"]
    review["request"]["object"]["spec"]["template"]["spec"]["containers"] = [{**containers[0], "image": image}]
    return review


def patched_image(answer: dict[str, Any]) -> str:
    ops = json.loads(base64.b64decode(answer["response"]["patch"]))
    (op,) = [o for o in ops if o["path"].endswith("/image")]
    assert op["op"] == "replace"
    value: str = op["value"]
    return value


@pytest.mark.parametrize("tag_ttl", [1.0])
async def test_mutate_pins_tags_to_registry_digests_and_follows_moves(
    registry: Registry,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    tag_ttl: float,
) -> None:
    first = image_factory.image("1.0", layers=[10_000])
    await registry.apush(first.layout, "1.0", f"{repo}:1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "pin.yaml").write_text(POLICY.format(repo=repo, repo_slug=repo.replace("/", "-")))
    port = free_port()
    config = Config(
        cache=CacheConfig(dir=tmp_path / "cache", tag_ttl=tag_ttl),
        upstreams=(UpstreamConfig("docker.io", registry.url),),
        admission=AdmissionConfig(enabled=True, listen=("127.0.0.1", port)),
        policies=policies,
    )
    mirror = await aiohttp_server(create_app(config))
    webhook = f"http://127.0.0.1:{port}"
    image = f"docker.io/{repo}:1.0"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{mirror.host}:{mirror.port}/readyz") as response:
            assert (await response.json())["checks"]["policies_loaded"] is True
        async with session.post(f"{webhook}/mutate", json=deployment_review(image)) as response:
            answer = await response.json()
        assert answer["response"]["allowed"] is True
        assert patched_image(answer) == f"{image}@{first.manifest_digest}"
        # The validating webhook sees the pinned image and admits it.
        async with session.post(
            f"{webhook}/validate", json=deployment_review(f"{image}@{first.manifest_digest}")
        ) as response:
            assert (await response.json())["response"]["allowed"] is True
        # Unpinned at validation: denied, naming policy, container and rule.
        async with session.post(f"{webhook}/validate", json=deployment_review(image)) as response:
            denied = (await response.json())["response"]
        assert denied["allowed"] is False and "requires a digest" in denied["status"]["message"]
        # The tag moves upstream; after tag_ttl the webhook pins the new digest.
        moved = image_factory.image("1.0", layers=[11_000])
        await registry.apush(moved.layout, "1.0", f"{repo}:1.0")
        await asyncio.sleep(tag_ttl + 0.1)
        async with session.post(f"{webhook}/mutate", json=deployment_review(image)) as response:
            assert patched_image(await response.json()) == f"{image}@{moved.manifest_digest}"
        # A tag the registry does not have: the deny says why.
        async with session.post(f"{webhook}/mutate", json=deployment_review(f"docker.io/{repo}:nope")) as response:
            missing = (await response.json())["response"]
        assert missing["allowed"] is False
        assert "not found" in missing["status"]["message"] or "unknown" in missing["status"]["message"]
