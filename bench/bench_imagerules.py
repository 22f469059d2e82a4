#!/usr/bin/env python3
"""Benchmark: what the ``image`` rules add to an admission review, per image, with the
manifests and config blobs already in the mirror's cache.

A real upstream (Debian's ``docker-registry``) holds realistic multi-arch images (a python-
like env and history, 8 layers, labels, a base annotation), pushed with skopeo; a real
``Mirror`` on a temp cache serves them. The same ``Evaluator`` call — the webhook's — is
timed with a baseline policy set (allowedRegistries + requireDigest) and with the baseline
plus a policy holding every ``image`` check, interleaved, for a 1-container and a
3-container review of digest-pinned images (as ``/mutate`` leaves them). Warm-up fills the
cache first; nothing reaches the upstream while measuring (checked).

    python3 bench/bench_imagerules.py [--iterations 3000]

Target (issue 6): < 1 ms added per image.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.config.settings import CacheConfig, Config, LogConfig, UpstreamConfig  # noqa: E402
from proxy.ops.logs import configure_logging  # noqa: E402
from proxy.policy.active import PolicySet  # noqa: E402
from proxy.policy.document import parse_policy  # noqa: E402
from proxy.policy.evaluation import Evaluator  # noqa: E402
from proxy.policy.sites import ImageSite  # noqa: E402
from proxy.registry.mirror import Mirror  # noqa: E402
from tests.support.images import OCI_INDEX, OciLayout, build_image  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

BASE = "org.opencontainers.image.base.name"
ENV = [
    "PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305",
    "PYTHON_VERSION=3.12.1",
    "PYTHON_PIP_VERSION=23.2.1",
    "PYTHON_SETUPTOOLS_VERSION=65.5.1",
    "PYTHON_GET_PIP_URL=https://github.com/pypa/get-pip/raw/4cfa4081d27285bda1220a62a5ebf5b4bd749cdb/public/get-pip.py",
    "PYTHON_GET_PIP_SHA256=9cc01665956d22b3bf057ae8287b035827bfd895da235bcea200ab3b811790b6",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
    "APP_HOME=/srv/app",
    "OTEL_SERVICE_NAME=checkout",
]
HISTORY = [
    "/bin/sh -c #(nop) ADD file:5d673e5c7c4a8f1d2b0c9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b in / ",
    '/bin/sh -c #(nop)  CMD ["bash"]',
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "RUN /bin/sh -c set -eux; apt-get update; apt-get install -y --no-install-recommends ca-certificates "
    "netbase tzdata; rm -rf /var/lib/apt/lists/* # buildkit",
    "ENV GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305",
    "ENV PYTHON_VERSION=3.12.1",
    'RUN /bin/sh -c set -eux; savedAptMark="$(apt-mark showmanual)"; apt-get update; apt-get install -y '
    "--no-install-recommends dpkg-dev gcc gnupg libbluetooth-dev libbz2-dev libc6-dev libdb-dev libexpat1-dev "
    'libffi-dev libgdbm-dev liblzma-dev libncursesw5-dev libreadline-dev; wget -O python.tar.xz "https://www.'
    'python.org/ftp/python/${PYTHON_VERSION%%[a-z]*}/Python-$PYTHON_VERSION.tar.xz"; ./configure --enable-'
    'optimizations --with-lto; make -j "$(nproc)"; make install # buildkit',
    'RUN /bin/sh -c set -eux; for src in idle3 pydoc3 python3 python3-config; do dst="$(echo "$src" | tr -d 3)"; '
    '[ -s "/usr/local/bin/$src" ]; ln -svT "$src" "/usr/local/bin/$dst"; done # buildkit',
    "ENV PYTHON_PIP_VERSION=23.2.1",
    "ENV PYTHON_GET_PIP_SHA256=9cc01665956d22b3bf057ae8287b035827bfd895da235bcea200ab3b811790b6",
    'CMD ["python3"]',
    "WORKDIR /srv/app",
    "COPY requirements.txt . # buildkit",
    "RUN |1 TARGETARCH=amd64 /bin/sh -c pip install --no-cache-dir -r requirements.txt # buildkit",
    "COPY . . # buildkit",
    "USER 10001",
]
BASELINE = {
    "apiVersion": "pullgate.dev/v1",
    "kind": "ImagePolicy",
    "metadata": {"name": "baseline"},
    "spec": {"match": {"images": ["**"]}, "rules": {"allowedRegistries": ["docker.io"], "requireDigest": True}},
}
HYGIENE = {
    "apiVersion": "pullgate.dev/v1",
    "kind": "ImagePolicy",
    "metadata": {"name": "hygiene"},
    "spec": {
        "match": {"images": ["**"]},
        "rules": {
            "image": {
                "denyRootUser": True,
                "denySecretsInEnv": True,
                "denySecretsInHistory": True,
                "maxCompressedSize": "500MiB",
                "maxLayers": 50,
                "requirePlatforms": ["linux/amd64", "linux/arm64"],
                "maxAge": "36500d",
                "requireLabels": ["org.opencontainers.image.source"],
                "allowedBaseImages": ["docker.io/library/python:*"],
            }
        },
    },
}


def push_image(registry: Registry, tmp: Path, name: str) -> str:
    layout = OciLayout(tmp / name)
    labels = {"org.opencontainers.image.source": "https://github.com/acme/app", BASE: "python:3.12-slim"}
    images = [
        build_image(
            layout.root, None, platform=p, layers=[256] * 8, user="10001", env=ENV, history=HISTORY, labels=labels
        )
        for p in ("linux/amd64", "linux/arm64")
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [i.descriptor().to_json() for i in images]}
    descriptor, _ = layout.write_json(index, OCI_INDEX)
    layout.tag(descriptor, "1")
    registry.push(layout.root, "1", f"bench/{name}:1")
    return f"docker.io/bench/{name}@{descriptor.digest}"


async def measure(mirror: Mirror, images: list[str], iterations: int) -> dict[str, Any]:
    policy = {name: parse_policy(doc) for name, doc in (("baseline", BASELINE), ("hygiene", HYGIENE))}
    evaluators = {
        "baseline": Evaluator(PolicySet.of((policy["baseline"],)), "allow", mirror, None, mirror),
        "with image rules": Evaluator(
            PolicySet.of((policy["baseline"], policy["hygiene"])), "allow", mirror, None, mirror
        ),
    }
    rows: dict[str, Any] = {}
    for count in (1, 3):
        sites = tuple(
            ImageSite(f"/spec/containers/{i}/image", "containers", f"c{i}", image)
            for i, image in enumerate(images[:count])
        )
        for evaluator in evaluators.values():  # warm-up: fills the cache, checks the verdict
            for _ in range(50):
                evaluation = await evaluator.evaluate(sites, "prod", mutate=False)
                assert evaluation.allowed and not evaluation.messages("warn"), evaluation.decisions
        times: dict[str, list[float]] = {name: [] for name in evaluators}
        for _ in range(iterations):
            for name, evaluator in evaluators.items():
                started = time.perf_counter()
                await evaluator.evaluate(sites, "prod", mutate=False)
                times[name].append(time.perf_counter() - started)
        rows[f"{count} image(s)"] = {
            name: (statistics.median(t) * 1e3, statistics.quantiles(t, n=100)[98] * 1e3) for name, t in times.items()
        }
    return rows


async def run(tmp: Path, iterations: int) -> None:
    with Registry(tmp / "registry") as registry:
        images = [push_image(registry, tmp, f"app{i}") for i in range(3)]
        config = Config(
            cache=CacheConfig(dir=tmp / "cache", tag_ttl=3600.0),
            upstreams=(UpstreamConfig("docker.io", registry.url),),
        )
        mirror = Mirror(config)
        await mirror.open()
        try:
            mark = registry.mark()
            await measure(mirror, images, 5)  # fills the cache
            mark = registry.mark()
            rows = await measure(mirror, images, iterations)
            upstream_requests = registry.count_requests(None, since=mark)
        finally:
            await mirror.close()
    print(f"Evaluator.evaluate, manifests and configs cached; {os.cpu_count()} CPUs, {iterations} reviews per row")
    print(f"{'review':<12} {'policies':<18} {'p50 ms':>8} {'p99 ms':>8}")
    for review, results in rows.items():
        for name, (p50, p99) in results.items():
            print(f"{review:<12} {name:<18} {p50:>8.3f} {p99:>8.3f}")
        count = int(review.split()[0])
        added = (results["with image rules"][0] - results["baseline"][0]) / count
        print(f"{review:<12} {'added per image':<18} {added:>8.3f}")
    print(f"upstream requests while measuring: {upstream_requests}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        configure_logging(LogConfig(level="warning", format="json"), stream=sink)
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(run(Path(tmp), args.iterations))


if __name__ == "__main__":
    main()
