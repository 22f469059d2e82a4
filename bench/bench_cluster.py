#!/usr/bin/env python3
"""The rollout storm against one pullgate, three pullgate replicas, and the reference proxy.

Starts in a temp dir, all on 127.0.0.1: one upstream (Debian's ``docker-registry``) holding a
cold 5-layer image of ~300 MiB, then for each setup, cold:

  1. one replica: ``python3 -m proxy serve`` with the default storage (``cache.dir``, filesystem);
  2. three replicas: three ``python3 -m proxy serve`` processes sharing one SeaweedFS bucket
     (``storage: {type: s3}``, the real ``weed`` binary) and one Redis (``coordination: {type:
     redis}``), each with its own cache dir and advertised peer URL; the clients are spread
     over the replicas;
  3. the reference: Distribution 2.8 in ``proxy: remoteurl:`` mode.

The storm: ``--clients`` threads (default 60) at once, each one node's pull (manifest by tag,
config, layers in turn) with containerd's retry (next replica, ``Range`` from the byte
reached; ``tests/support/puller.py``); every client checks sizes, a sample hashes every byte.
Reported: storm wall time, complete pulls, upstream GETs per blob (the upstream's access
log), peak RSS of each cache process (VmHWM and sampled VmRSS; SeaweedFS and Redis are not
counted). ``--quick`` shrinks it to a smoke run. Prints one markdown table and writes the
raw numbers to bench/results/.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_mirror as bm
import harness

from tests.support.fleet import BUCKET, Fleet
from tests.support.images import ImageInfo, build_image
from tests.support.puller import PullResult, pull, spread
from tests.support.redis_server import RedisServer
from tests.support.registry import Registry
from tests.support.seaweedfs import SeaweedFS

MiB = 1 << 20
REPO, TAG = "library/rollout", "1"
QUIET = {"log": {"level": "warning"}}


@dataclass(frozen=True)
class Plan:
    layers_mib: tuple[int, ...]
    clients: int
    sample_every: int  # every Nth client hashes its bytes (hashing all would measure the client)
    deadline: int


FULL = Plan(layers_mib=(100, 80, 60, 40, 20), clients=60, sample_every=10, deadline=1800)
QUICK = Plan(layers_mib=(4, 3, 2, 1, 1), clients=10, sample_every=2, deadline=240)


@dataclass
class Setup:
    name: str
    urls: list[str]
    pids: list[int]


def storm(setup: Setup, image: ImageInfo, plan: Plan) -> dict[str, Any]:
    starts = spread(plan.clients, len(setup.urls))
    began = time.monotonic()
    with ThreadPoolExecutor(plan.clients) as pool:
        results: list[PullResult] = list(pool.map(
            lambda i: pull(setup.urls, starts[i], image, REPO, TAG, verify=i % plan.sample_every == 0, timeout=300),
            range(plan.clients)))  # fmt: skip
    wall = time.monotonic() - began
    errors = [r.error for r in results if not r.ok]
    return {"wall_seconds": wall, "clients": plan.clients, "ok": plan.clients - len(errors),
            "errors": errors[:5], "retries": sum(len(r.failures) for r in results),
            "bytes": sum(r.bytes for r in results)}  # fmt: skip


def measure_setup(setup: Setup, upstream: Registry, image: ImageInfo, plan: Plan) -> dict[str, Any]:
    mark = upstream.mark()
    with contextlib.ExitStack() as stack:
        samplers = [stack.enter_context(bm.RssSampler(pid)) for pid in setup.pids]
        result = storm(setup, image, plan)
    gets = [upstream.count_requests("GET", rf"/blobs/{re.escape(d)}$", since=mark) for d in image.blob_digests]
    rss = [max(s.peak, bm.proc_status_kib(pid, "VmHWM")) for s, pid in zip(samplers, setup.pids, strict=True)]
    bm.log(f"{setup.name}: {result['wall_seconds']:.2f} s, {result['ok']}/{result['clients']} ok, "
           f"upstream GETs per blob {sorted(set(gets))}, RSS {[round(k / 1024) for k in rss]} MiB")  # fmt: skip
    return {**result, "upstream_gets_per_blob": sorted(set(gets)), "upstream_gets": sum(gets),
            "rss_peak_kib": rss, "cluster_metrics": [cluster_metrics(url) for url in setup.urls]}  # fmt: skip


_CLUSTER_SERIES = ("pullgate_coordination_up", "pullgate_object_store_up", "pullgate_shared_tier_blobs_total",
                   "pullgate_upstream_errors_total")  # fmt: skip


def cluster_metrics(base: str) -> list[str]:
    """What a replica says of the shared tier (where its blobs came from, whether Redis and
    the object store answered): the first thing to read when a blob went upstream twice."""
    try:
        with bm._OPENER.open(f"{base}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:  # the reference has no such endpoint
        return [f"({exc.__class__.__name__})"]
    return [line for line in text.splitlines()
            if line.startswith(_CLUSTER_SERIES) and ("_up " in line or not line.endswith(" 0.0"))]  # fmt: skip


@contextlib.contextmanager
def one_replica(work: Path, upstream: Registry) -> Iterator[Setup]:
    with bm.running(bm.Pullgate(work / "one", upstream.url)) as pg:
        yield Setup("pullgate, 1 replica (filesystem)", [pg.url], [pg.pid])


@contextlib.contextmanager
def three_replicas(work: Path, upstream: Registry) -> Iterator[Setup]:
    with SeaweedFS(work / "seaweedfs") as store, RedisServer(work / "redis") as redis:
        store.create_bucket(BUCKET)
        fleet = Fleet(work / "fleet", upstream.url, 3, engine=store, redis_url=redis.url, prefix="bench/",
                      lease_ttl="30s", **QUIET)  # fmt: skip
        with fleet:
            pids = [d.proc.pid for d in fleet.daemons if d.proc is not None]
            yield Setup("pullgate, 3 replicas (SeaweedFS S3 + Redis)", fleet.urls, pids)


@contextlib.contextmanager
def reference(work: Path, upstream: Registry) -> Iterator[Setup]:
    with bm.running(bm.reference(work / "reference", upstream)) as ref:
        pid = bm.registry_pid(ref)
        assert pid is not None
        yield Setup("reference (Distribution proxy)", [ref.url], [pid])


def upstream_transfer(upstream: Registry, image: ImageInfo) -> float:
    """One client fetching every blob straight from the upstream, all at once: the least
    time any cache needs to get the bytes."""
    sizes = (len(image.config_bytes), *image.layer_sizes)
    began = time.monotonic()
    with ThreadPoolExecutor(len(sizes)) as pool:
        urls = [f"{upstream.url}/v2/{REPO}/blobs/{d}" for d in image.blob_digests]
        list(pool.map(lambda pair: bm.timed_get(*pair), zip(urls, sizes, strict=True)))
    return time.monotonic() - began


def measure(plan: Plan, work: Path) -> dict[str, Any]:
    with bm.running(Registry(work / "upstream")) as upstream:
        image = build_image(work / "layout", TAG, layers=tuple(m * MiB for m in plan.layers_mib))
        upstream.push(image.layout, TAG, f"{REPO}:{TAG}", all_images=False, timeout=600)
        bm.log(f"upstream {upstream.url}: {REPO}:{TAG}, layers {plan.layers_mib} MiB")
        out: dict[str, Any] = {"upstream_transfer_seconds": upstream_transfer(upstream, image),
                               "image_bytes": image.total_size}  # fmt: skip
        for key, setup in (("one", one_replica), ("three", three_replicas), ("reference", reference)):
            with setup(work, upstream) as running:
                out[key] = {"name": running.name, **measure_setup(running, upstream, image, plan)}
    return out


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "all_ok": all(r[k]["ok"] == r[k]["clients"] for k in ("one", "three", "reference")),
        "one_get_per_blob": r["one"]["upstream_gets_per_blob"] == [1] and r["three"]["upstream_gets_per_blob"] == [1],
    }


def table(r: dict[str, Any], plan: Plan) -> str:
    head = ("setup", "storm wall (s)", "vs 1 replica", "complete pulls", "upstream GETs per blob",
            "peak RSS per cache process (MiB)")  # fmt: skip
    rows = []
    for key in ("one", "three", "reference"):
        s = r[key]
        gets = ",".join(map(str, s["upstream_gets_per_blob"]))
        rows.append((s["name"], f"{s['wall_seconds']:.2f}", f"{s['wall_seconds'] / r['one']['wall_seconds']:.2f}x",
                     f"{s['ok']}/{s['clients']}", gets, " / ".join(f"{k / 1024:.0f}" for k in s["rss_peak_kib"])))
    rows.append(("upstream direct, one client, all blobs at once (the transfer floor)",
                 f"{r['upstream_transfer_seconds']:.2f}", "", "", "", ""))  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "cluster", "small sizes (smoke test, well under a minute)")
    parser.add_argument("--clients", type=int, help="clients in the storm (default 60; --quick 10)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.clients:
        plan = Plan(plan.layers_mib, args.clients, plan.sample_every, plan.deadline)
    result = harness.run("cluster", args, plan, plan.deadline, lambda work: measure(plan, work))
    result["verdicts"] = verdicts(result)
    out = harness.save("cluster", args, result)
    print(table(result, plan))
    mib = result["image_bytes"] / MiB
    print(f"\n{result['mode']} run, {result['seconds']} s, {plan.clients} clients x {mib:.0f} MiB image "
          f"({len(plan.layers_mib)} layers), {result['env']['cpus']} CPUs, loopback; JSON: {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
