#!/usr/bin/env python3
"""Redirect mode (``storage.redirect: true``): what a client gets when pullgate answers a
blob GET with ``307`` to a presigned URL of the object store, against a GET of the same
object straight from the store.

Starts in a temp dir, all on 127.0.0.1: an upstream (Debian's ``docker-registry``) holding one
image with one large layer (256 MiB; ``--quick``: 8 MiB), SeaweedFS (``weed``, S3 gateway),
and pullgate (``python3 -m proxy serve``, its own process) with ``storage: s3`` and
``redirect: true``. One verified GET through pullgate fills the bucket (pullgate serves it
and uploads it behind the download). Then, repetitions interleaved, median of each:

  - redirect: GET the blob from pullgate, follow the 307, read the body (from SeaweedFS);
  - direct: GET a presigned URL of the object from SeaweedFS (made by boto), read the body;
  - local tier, for context: a second pullgate with ``redirect: false`` on the same bucket
    serves the blob from its local disk (filled from the object store by one warm-up GET);
  - the 307 alone: latency of pullgate's redirect answer (not followed), median of 50.

The body is read into a 4 MiB buffer and discarded (``bench_mirror.fetch``). Prints one
markdown table row set and writes the raw numbers to bench/results/.
"""

from __future__ import annotations

import http.client
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bench_mirror as bm
import harness
import yaml

from tests.support.images import ImageInfo, build_image
from tests.support.registry import Registry
from tests.support.seaweedfs import SeaweedFS

MiB = 1 << 20
REPO, TAG, BUCKET = "library/redirect", "1", "bench-redirect"
ACCESS_ENV, SECRET_ENV = "BENCH_REDIRECT_S3_ACCESS", "BENCH_REDIRECT_S3_SECRET"


@dataclass(frozen=True)
class Plan:
    blob_mib: int
    reps: int
    latency_gets: int
    deadline: int


FULL = Plan(blob_mib=256, reps=5, latency_gets=50, deadline=900)
QUICK = Plan(blob_mib=8, reps=3, latency_gets=20, deadline=240)


class S3Pullgate(bm.Pullgate):
    """``bm.Pullgate`` with ``storage: s3`` on the bench bucket."""

    def __init__(self, workdir: Path, upstream_url: str, engine: SeaweedFS, *, redirect: bool) -> None:
        super().__init__(workdir, upstream_url)
        config = yaml.safe_load(self.config.read_text())
        config["storage"] = {
            "type": "s3", "endpoint": engine.endpoint, "bucket": BUCKET, "access_key_env": ACCESS_ENV,
            "secret_key_env": SECRET_ENV, "redirect": redirect,
        }  # fmt: skip
        self.config.write_text(yaml.safe_dump(config))


def get(url: str) -> tuple[int, str | None, float]:
    """One GET, not followed: (status, Location, seconds to the answer)."""
    parts = urlsplit(url)
    started = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location"), time.monotonic() - started
    finally:
        conn.close()


def redirected_get(url: str, size: int) -> float:
    """Seconds for the 307 and the whole body from where it points."""
    status, location, first = get(url)
    if status != 307 or location is None:
        raise RuntimeError(f"GET {url}: expected a 307, got {status}")
    return first + bm.timed_get(location, size)


def stored(engine: SeaweedFS, digest: str) -> bool:
    listing = engine.client().list_objects_v2(Bucket=BUCKET)
    return any(item["Key"].endswith(digest.partition(":")[2]) for item in listing.get("Contents", []))


def presigned(engine: SeaweedFS, digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    key = f"blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}"  # proxy.registry.objectstore's layout
    url: str = engine.client().generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600
    )
    return url


def gbps(size: int, seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_seconds": median, "gbps": size / median / 1e9}


def measure(plan: Plan, work: Path) -> dict[str, Any]:
    with bm.running(SeaweedFS(work / "seaweedfs")) as engine, bm.running(Registry(work / "upstream")) as upstream:
        engine.create_bucket(BUCKET)
        os.environ[ACCESS_ENV], os.environ[SECRET_ENV] = engine.keys.access_key, engine.keys.secret_key
        image: ImageInfo = build_image(work / "layout", TAG, layers=(plan.blob_mib * MiB,))
        upstream.push(image.layout, TAG, f"{REPO}:{TAG}", all_images=False, timeout=300)
        digest, size = image.layer_digests[0], image.layer_sizes[0]
        bm.log(f"upstream {upstream.url}, SeaweedFS {engine.endpoint}: one {plan.blob_mib} MiB layer")
        redirect_pg = S3Pullgate(work / "pg-redirect", upstream.url, engine, redirect=True)
        local_pg = S3Pullgate(work / "pg-local", upstream.url, engine, redirect=False)
        with bm.running(redirect_pg) as pg, bm.running(local_pg) as local:
            url = f"{pg.url}/v2/{REPO}/blobs/{digest}"
            bm.get_verified(url, digest)  # not in the bucket yet: served by pullgate, uploaded behind
            deadline = time.monotonic() + 120
            while not stored(engine, digest):
                if time.monotonic() > deadline:
                    raise RuntimeError("the blob never reached the bucket")
                time.sleep(0.2)
            bm.get_verified(url, digest)  # now a 307 (urllib follows it): the store's copy is right
            local_url = f"{local.url}/v2/{REPO}/blobs/{digest}"
            bm.get_verified(local_url, digest)  # fills the second replica's local tier from the store
            direct = presigned(engine, digest)
            times: dict[str, list[float]] = {"redirect": [], "direct": [], "local": []}
            for _ in range(plan.reps):
                times["redirect"].append(redirected_get(url, size))
                times["direct"].append(bm.timed_get(direct, size))
                times["local"].append(bm.timed_get(local_url, size))
            latencies = [get(url)[2] for _ in range(plan.latency_gets)]
    result = {name: gbps(size, values) for name, values in times.items()}
    result["redirect_answer_ms"] = {"median": statistics.median(latencies) * 1000,
                                    "p90": statistics.quantiles(latencies, n=10)[-1] * 1000}  # fmt: skip
    result["blob_bytes"] = size
    return result


def table(r: dict[str, Any], plan: Plan) -> str:
    ratio = r["redirect"]["gbps"] / r["direct"]["gbps"]
    rows = [
        (f"redirect mode: blob GET via 307 to the object store, {plan.blob_mib} MiB (GB/s, median of {plan.reps})",
         f"{r['redirect']['gbps']:.2f}", f"{r['direct']['gbps']:.2f}", f"{ratio:.2f}x of direct"),
        ("... pullgate's 307 answer alone (ms, median / p90)",
         f"{r['redirect_answer_ms']['median']:.1f} / {r['redirect_answer_ms']['p90']:.1f}", "-", ""),
        ("... pullgate serving the same blob from its local tier, redirect off (GB/s)",
         f"{r['local']['gbps']:.2f}", "-", ""),
    ]
    head = ("measurement", "pullgate", "object store direct (presigned GET)", "ratio")
    return harness.markdown(head, rows)


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "redirect", "small sizes (smoke test, seconds)").parse_args(argv)
    plan = QUICK if args.quick else FULL
    result = harness.run("redirect", args, plan, plan.deadline, lambda work: measure(plan, work))
    out = harness.save("redirect", args, result)
    print(table(result, plan))
    print(f"\n{result['mode']} run, {result['env']['cpus']} CPUs, loopback; JSON: {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
