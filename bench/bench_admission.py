"""Benchmark: ``POST /mutate`` of a 3-container Deployment with every tag already cached.

The webhook runs in its own process (one event loop, JSON logs rendered to /dev/null as in
production), with the policy set below and an in-memory resolver standing in for a warm
mirror cache. Load comes from wrk (POST body via a Lua script) when installed, and from an
aiohttp client at fixed concurrency for latency percentiles measured per request.

    python bench/bench_admission.py [--seconds 5] [--connections 1,8,32]

Target (issue 4): p99 < 20 ms and >= 1,000 reviews/s on one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config.settings import AdmissionConfig, Config, LogConfig  # noqa: E402
from proxy.ops.logs import configure_logging  # noqa: E402

REVIEW = ROOT / "tests" / "data" / "admission" / "deployment-create.json"
POLICIES = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: prod-pinned}
spec:
  match: {images: ["**"], namespaces: ["prod"]}
  rules: {requireDigest: true, resolveTags: true}
---
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: registries}
spec:
  match: {images: ["**"]}
  rules: {allowedRegistries: ["docker.io", "ghcr.io", "quay.io"]}
---
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: no-latest}
spec:
  mode: warn
  match: {images: ["**"]}
  rules: {denyTags: ["latest"]}
"""
TAGS = (
    "docker.io/library/nginx:1.25",
    "ghcr.io/acme/proxy:2.1",
    "quay.io/prometheus/node-exporter:v1.8.0",
)
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb"); wrk.body = f:read("*a"); f:close()
"""


# --- server (child process) -------------------------------------------------------------------
async def serve(port: int, policies: Path) -> None:
    import dataclasses

    import structlog
    from prometheus_client import CollectorRegistry

    from proxy.http.webhook_listener import serve_webhook
    from proxy.ops.metrics import Metrics
    from tests.support.resolver import DictResolver

    config = dataclasses.replace(Config(), policies=policies, admission=AdmissionConfig(listen=("127.0.0.1", port)))
    resolver = DictResolver(dict.fromkeys(TAGS))
    async with serve_webhook(config, resolver, Metrics(CollectorRegistry()), structlog.get_logger()):
        print("ready", flush=True)
        await asyncio.Event().wait()


# --- load --------------------------------------------------------------------------------------
async def aiohttp_load(url: str, body: bytes, connections: int, seconds: float) -> tuple[float, list[float]]:
    import aiohttp

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
            latencies.append(time.perf_counter() - started)
            assert resp.status == 200 and b'"patch"' in answer, answer[:300]

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


async def fixed_rate_load(url: str, body: bytes, rate: float, seconds: float) -> tuple[float, list[float]]:
    """Open loop: a request every 1/rate s whatever the answers do; latency counts from the
    scheduled send time, so a stall is not hidden (no coordinated omission)."""
    import aiohttp

    latencies: list[float] = []
    headers = {"Content-Type": "application/json"}

    async def one(session: aiohttp.ClientSession, scheduled: float) -> None:
        async with session.post(url, data=body, headers=headers) as resp:
            answer = await resp.read()
        latencies.append(time.perf_counter() - scheduled)
        assert resp.status == 200 and b'"patch"' in answer, answer[:300]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


def wrk_load(url: str, body_file: Path, connections: int, seconds: float) -> tuple[float, float, float]:
    script = body_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT.format(body=body_file))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))

    def percentile(p: str) -> float:
        line = next(line for line in out.splitlines() if line.strip().startswith(p + "%"))
        value = line.split()[1]
        unit = value.lstrip("0123456789.")
        return float(value[: -len(unit)]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    if " Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return rate, percentile("50"), percentile("99")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", default="1,8,32")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop row: reviews/s")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policies", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with open(os.devnull, "w") as sink:
            configure_logging(LogConfig(format="json"), stream=sink)
            asyncio.run(serve(args.serve, args.policies))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.seconds, [int(c) for c in args.connections.split(",")], args.rate)


def run(tmp: Path, seconds: float, connection_counts: list[int], fixed_rate: float) -> None:
    (tmp / "policies.yaml").write_text(POLICIES)
    body = tmp / "review.json"
    body.write_bytes(json.dumps(json.loads(REVIEW.read_text())).encode())
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--policies", str(tmp / "policies.yaml")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/mutate"
        asyncio.run(aiohttp_load(url, body.read_bytes(), 4, 1.0))  # warm-up
        rows: list[tuple[str, int | str, float, float, float]] = []
        for connections in connection_counts:
            rate, latencies = asyncio.run(aiohttp_load(url, body.read_bytes(), connections, seconds))
            q = statistics.quantiles(latencies, n=100)
            rows.append(("aiohttp", connections, rate, q[49] * 1000, q[98] * 1000))
            if shutil.which("wrk"):
                rows.append(("wrk", connections, *wrk_load(url, body, connections, seconds)))
        rate, latencies = asyncio.run(fixed_rate_load(url, body.read_bytes(), fixed_rate, seconds))
        q = statistics.quantiles(latencies, n=100)
        rows.append((f"open-loop {fixed_rate:g}/s", "-", rate, q[49] * 1000, q[98] * 1000))
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"/mutate, 3-container Deployment, tags cached; {os.cpu_count()} CPUs, {seconds:g} s per row")
    print(f"{'client':<20} {'conns':>5} {'reviews/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for client, connections, rate, p50, p99 in rows:
        print(f"{client:<20} {connections:>5} {rate:>10,.0f} {p50:>8.2f} {p99:>8.2f}")


if __name__ == "__main__":
    main()
