#!/usr/bin/env python3
"""pullgate against the reference pull-through cache, side by side, in one unattended run.

Starts in a temp dir: one upstream (Debian's ``docker-registry``, CNCF Distribution 2.8),
the reference cache (the same binary in ``proxy: remoteurl:`` mode) and pullgate
(``python3 -m proxy serve`` as its own process, so its RSS is its own), all on 127.0.0.1.
Both caches run with warning-level logs and no access log; only the upstream keeps its
access log, which is how upstream requests are counted.

Measured (``--quick`` shrinks sizes and durations to a < 1 minute smoke run):
  1. warm blob throughput (read and discarded, median of N) - pullgate, reference, upstream
  2. warm manifest req/s by tag and by digest (wrk -t2 -c32)
  3. cold pull of a 3-layer image with skopeo, fresh cache storage each repetition
  4. 16 concurrent cold GETs of one big blob: wall time and upstream blob GETs
  5. pullgate peak RSS during (4) (VmHWM of a fresh process, and sampled VmRSS)

Prints one markdown table and writes the raw numbers as JSON to bench/results/.
Loopback on a small shared machine is noisy: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from limits import Nginx, TrivialServer  # noqa: E402 - bench/ is the script directory, first on sys.path

from tests.support import skopeo  # noqa: E402
from tests.support.images import (  # noqa: E402
    DOCKER_INDEX,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageInfo,
    build_image,
)
from tests.support.procs import free_port, http_status, run, start_daemon, stop_daemon, wait_until  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

MiB = 1 << 20
GB = 1e9
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_INDEX))
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BIG_REPO, COLD_REPO, TAG = "library/bench-big", "library/bench-cold", "1"
CACHE_LOG = {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}}


@dataclass(frozen=True)
class Plan:
    blob_mib: int
    reps: int
    wrk_seconds: int
    connections: int
    cold_layers_mib: tuple[int, ...]
    cold_reps: int
    concurrency: int
    deadline: int  # hard bound on the whole run, seconds
    manifest_rounds: int  # alternating wrk runs of pullgate and its limit (medians)
    concurrency_rounds: int  # alternating 16-cold (fresh pullgate) and nginx-warm runs (medians)


FULL = Plan(256, 5, 5, 32, (16, 16, 16), 3, 16, 900, 3, 3)
QUICK = Plan(16, 2, 1, 32, (1, 1, 1), 1, 16, 150, 1, 1)


# --- the processes -----------------------------------------------------------------------
class Pullgate:
    """``python3 -m proxy serve`` with a fresh cache dir under ``workdir``."""

    src = ROOT  # where ``proxy/`` is imported from (``--pullgate-src``)

    def __init__(self, workdir: Path, upstream_url: str, log_level: str = "warning") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "pullgate.log"
        self.config = workdir / "pullgate.yaml"
        self.config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}",
            "cache": {"dir": str(workdir / "cache")},
            "upstreams": [{"name": "docker.io", "url": upstream_url}],
            "default_upstream": "docker.io",
            "log": {"level": log_level},
        }))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> Pullgate:
        self._proc = start_daemon([sys.executable, "-m", "proxy", "serve", "--config", str(self.config)],
                                  stdout=self.log, stderr=self.log, cwd=self.src)
        wait_until(lambda: http_status(f"{self.url}/v2/", timeout=1.0) == 200, timeout=20,
                   what="pullgate", proc=self._proc, log=self.log)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            stop_daemon(self._proc)
            self._proc = None


def reference(workdir: Path, upstream: Registry) -> Registry:
    return Registry(workdir, proxy_remoteurl=upstream.url, extra_config={"log": CACHE_LOG})


def registry_pid(reg: Registry) -> int | None:
    proc = getattr(reg, "_proc", None)
    return proc.pid if proc is not None else None


@contextlib.contextmanager
def running(server: Pullgate | Registry) -> Iterator[Any]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- clients -----------------------------------------------------------------------------
def fetch(url: str, *, timeout: float = 120.0) -> tuple[int, int, float]:
    """GET ``url`` and discard the body: (status, bytes, seconds).

    ``readinto`` a 4 MiB buffer costs one recv per buffer-full and no per-chunk allocation,
    so the client takes less CPU per byte than ``curl -o /dev/null`` (16 KiB buffer) and the
    servers, not the client, set the pace. http.client never uses an http_proxy.
    """
    parts = urlsplit(url)
    started = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        buffer = memoryview(bytearray(4 * MiB))
        total = 0
        while n := response.readinto(buffer):
            total += n
        return response.status, total, time.monotonic() - started
    finally:
        conn.close()


def timed_get(url: str, size: int) -> float:
    """Seconds a GET of ``url`` took; checks status and length."""
    code, got, seconds = fetch(url)
    if code != 200 or got != size:
        raise RuntimeError(f"GET {url}: status {code}, {got} of {size} bytes")
    return seconds


def get_verified(url: str, digest: str, accept: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A streamed GET whose body must hash to ``digest`` (warms a cache and proves it is right).
    Returns the first MiB of the body and the headers."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    hasher, head = hashlib.sha256(), b""
    with _OPENER.open(request, timeout=120) as response:
        while chunk := response.read(MiB):
            hasher.update(chunk)
            head = head or chunk
        headers = dict(response.headers)
    if f"sha256:{hasher.hexdigest()}" != digest:
        raise RuntimeError(f"GET {url}: body does not match {digest}")
    return head, headers


def wrk(url: str, seconds: int, connections: int) -> dict[str, Any]:
    out = run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", f"Accept: {ACCEPT}", url],
              timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if rps is None or total is None:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)), "errors": errors}


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; ``peak`` in KiB."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def blob_gets(upstream: Registry, digest: str, since: int) -> int:
    return upstream.count_requests("GET", rf"/blobs/{re.escape(digest)}$", since=since)


# --- the measurements --------------------------------------------------------------------
def warm_up(url: str, digest: str, upstream: Registry, *, tries: int = 10) -> int:
    """GET (verified) until one GET causes no upstream blob GET; returns the GETs needed.

    Distribution's proxy streams a cold blob to the client from one upstream GET while a
    background goroutine stores it from a second one, and answers from upstream until that
    copy is committed: a single warm-up GET does not make it warm.
    """
    for attempt in range(1, tries + 1):
        mark = upstream.mark()
        get_verified(url, digest)
        if blob_gets(upstream, digest, mark) == 0:
            return attempt
    raise RuntimeError(f"{url}: still fetching from upstream after {tries} GETs")


def warm_blobs(bases: dict[str, str], upstream: Registry, image: ImageInfo, reps: int) -> dict[str, Any]:
    """Median throughput per server; repetitions interleaved so noise bursts hit all alike."""
    digest, size = image.layer_digests[0], image.layer_sizes[0]
    urls = {name: f"{base}/v2/{BIG_REPO}/blobs/{digest}" for name, base in bases.items()}
    warmups = {name: warm_up(url, digest, upstream) if name != "upstream" else 0 for name, url in urls.items()}
    mark = upstream.mark()
    samples: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(reps):
        for name, url in urls.items():
            samples[name].append(timed_get(url, size))
    # Only the direct runs may reach the upstream now.
    leaked = blob_gets(upstream, digest, mark) - reps
    return {name: {"gbps": size / statistics.median(s) / GB, "seconds": s, "bytes": size,
                   "warmup_gets": warmups[name], "upstream_gets_from_caches_during_reps": leaked}
            for name, s in samples.items()}


def warm_manifests(base: str, repo: str, image: ImageInfo, plan: Plan) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind, ref in (("tag", TAG), ("digest", image.manifest_digest)):
        url = f"{base}/v2/{repo}/manifests/{ref}"
        _, headers = get_verified(url, image.manifest_digest, ACCEPT)
        if headers.get("Docker-Content-Digest") != image.manifest_digest:
            raise RuntimeError(f"{url}: Docker-Content-Digest {headers.get('Docker-Content-Digest')}")
        result[kind] = wrk(url, plan.wrk_seconds, plan.connections)
    return result


def cold_pull(host: str, workdir: Path, upstream: Registry, image: ImageInfo) -> dict[str, Any]:
    dest = Path(tempfile.mkdtemp(dir=workdir, prefix="pull-"))
    mark = upstream.mark()
    started = time.monotonic()
    skopeo.copy(f"docker://{host}/{COLD_REPO}:{TAG}", f"oci:{dest}:{TAG}", all_images=False, timeout=300)
    seconds = time.monotonic() - started
    gets = sum(blob_gets(upstream, d, mark) for d in image.blob_digests)
    return {"seconds": seconds, "upstream_blob_gets": gets}


def warm_fanout(base: str, image: ImageInfo, n: int) -> dict[str, Any]:
    digest, size = image.layer_digests[0], image.layer_sizes[0]
    url = f"{base}/v2/{BIG_REPO}/blobs/{digest}"
    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: fetch(url, timeout=300), range(n)))
    wall = time.monotonic() - started
    ok = sum(1 for code, got, _ in results if code == 200 and got == size)
    return {"wall_seconds": wall, "ok": ok, "clients": n}


def concurrent_cold(base: str, upstream: Registry, image: ImageInfo, n: int) -> dict[str, Any]:
    digest, size = image.layer_digests[0], image.layer_sizes[0]
    # Like a real client: the manifest first (cached now), then the blobs, all cold.
    get_verified(f"{base}/v2/{BIG_REPO}/manifests/{TAG}", image.manifest_digest, ACCEPT)
    mark = upstream.mark()
    started = time.monotonic()
    url = f"{base}/v2/{BIG_REPO}/blobs/{digest}"
    with ThreadPoolExecutor(n) as pool:  # recv releases the GIL: 16 real concurrent readers
        results = list(pool.map(lambda _: fetch(url, timeout=300), range(n)))
    wall = time.monotonic() - started
    ok = sum(1 for code, got, _ in results if code == 200 and got == size)
    return {"wall_seconds": wall, "ok": ok, "clients": n,
            "upstream_blob_gets": blob_gets(upstream, digest, mark),
            "upstream_blob_heads": upstream.count_requests("HEAD", rf"/blobs/{re.escape(digest)}$", since=mark)}


# --- the run -----------------------------------------------------------------------------
def build_and_push(work: Path, upstream: Registry, plan: Plan) -> tuple[ImageInfo, ImageInfo]:
    big = build_image(work / "layout-big", TAG, layers=(plan.blob_mib * MiB,))
    cold = build_image(work / "layout-cold", TAG, layers=tuple(m * MiB for m in plan.cold_layers_mib))
    upstream.push(big.layout, TAG, f"{BIG_REPO}:{TAG}", all_images=False, timeout=300)
    upstream.push(cold.layout, TAG, f"{COLD_REPO}:{TAG}", all_images=False, timeout=300)
    return big, cold


def phase_warm(work: Path, upstream: Registry, big: ImageInfo, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"blob": {}, "manifest": {}}
    pg_server, ref_server = Pullgate(work / "pg-warm", upstream.url), reference(work / "ref-warm", upstream)
    # The same at pullgate's default log level: one JSON request line per request (what a
    # deployment pays unless it lowers the level; the limit has no access log).
    pg_info_server = Pullgate(work / "pg-warm-info", upstream.url, log_level="info")
    with running(pg_server) as pg, running(ref_server) as ref, running(pg_info_server) as pg_info:
        out["blob"] = warm_blobs({"pullgate": pg.url, "reference": ref.url, "upstream": upstream.url},
                                 upstream, big, plan.reps)
        log("warm blob GB/s: " + ", ".join(f"{n} {r['gbps']:.2f}" for n, r in out["blob"].items()))
        body, _ = get_verified(f"{pg.url}/v2/{BIG_REPO}/manifests/{TAG}", big.manifest_digest, ACCEPT)
        limit = TrivialServer(work / "trivial", body, OCI_MANIFEST, big.manifest_digest)
        with limit:
            # pullgate and its limit alternate, ``manifest_rounds`` times each (medians): a
            # shared machine's speed drifts within seconds, and the ratio is the target.
            rounds: dict[str, list[dict[str, Any]]] = {"pullgate": [], "limit": [], "pullgate_info": []}
            for _ in range(plan.manifest_rounds):
                for name, base in (("pullgate", pg.url), ("limit", limit.url), ("pullgate_info", pg_info.url)):
                    rounds[name].append(warm_manifests(base, BIG_REPO, big, plan))
            for name, results in rounds.items():
                out["manifest"][name] = median_manifests(results)
            for name, base in (("reference", ref.url), ("upstream", upstream.url)):
                out["manifest"][name] = warm_manifests(base, BIG_REPO, big, plan)
            for name, r in out["manifest"].items():
                log(f"manifests {name}: tag {r['tag']['rps']:.0f} req/s, digest {r['digest']['rps']:.0f} req/s")
    return out


def median_manifests(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind (tag, digest): the round with the median req/s, and every round's req/s."""
    out: dict[str, Any] = {}
    for kind in ("tag", "digest"):
        ordered = sorted((r[kind] for r in results), key=lambda r: r["rps"])
        out[kind] = {**ordered[len(ordered) // 2], "rounds_rps": [r[kind]["rps"] for r in results]}
    return out


def phase_cold_pull(work: Path, upstream: Registry, cold: ImageInfo, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("pullgate", "reference", "upstream"):
        runs = []
        for rep in range(plan.cold_reps):
            if name == "upstream":
                runs.append(cold_pull(upstream.host, work, upstream, cold))
                continue
            server: Pullgate | Registry = (Pullgate(work / f"pg-cold-{rep}", upstream.url) if name == "pullgate"
                                          else reference(work / f"ref-cold-{rep}", upstream))
            with running(server):
                runs.append(cold_pull(server.url.removeprefix("http://"), work, upstream, cold))
        out[name] = {"seconds": statistics.median(r["seconds"] for r in runs), "runs": runs}
        log(f"cold pull {name}: {out[name]['seconds']:.2f} s")
    return out


def phase_concurrent(work: Path, upstream: Registry, big: ImageInfo, plan: Plan) -> dict[str, Any]:
    """16 cold GETs on a fresh pullgate, then nginx serving the same 16 warm, alternately
    ``concurrency_rounds`` times (medians: one pair's ratio moved from 1.1x to 1.7x on the
    same code); pullgate warm once, the reference once."""
    out: dict[str, Any] = {}
    colds: list[dict[str, Any]] = []
    nginx_walls: list[float] = []
    nginx_cpus: list[float] = []  # the whole machine's busy CPU seconds during each nginx run
    root = work / "nginx-root"
    for round_ in range(plan.concurrency_rounds):
        pg_dir = work / f"pg-conc-{round_}"
        with running(Pullgate(pg_dir, upstream.url)) as pg:
            baseline = proc_status_kib(pg.pid, "VmRSS")
            with RssSampler(pg.pid) as sampler:
                cold = concurrent_cold(pg.url, upstream, big, plan.concurrency)
            colds.append(cold | {"rss_start_kib": baseline, "rss_peak_sampled_kib": sampler.peak,
                                 "vm_hwm_kib": proc_status_kib(pg.pid, "VmHWM")})
            if round_ == 0:
                out["pullgate_warm"] = warm_fanout(pg.url, big, plan.concurrency)
                # The fan-out limit: nginx sendfile serving the same bytes (the file in this
                # pullgate's store) to the same number of clients, warm.
                _link_blob(pg_dir, root, big.layer_digests[0])
        with Nginx(work / f"nginx-{round_}", root) as nginx:
            busy = machine_busy_seconds()
            fanout = warm_fanout(nginx.url, big, plan.concurrency)
            nginx_cpus.append(machine_busy_seconds() - busy)
        if fanout["ok"] != fanout["clients"]:
            raise RuntimeError(f"nginx served {fanout['ok']} of {fanout['clients']} whole responses")
        nginx_walls.append(fanout["wall_seconds"])
    by_wall = sorted(colds, key=lambda r: r["wall_seconds"])
    out["pullgate"] = by_wall[len(by_wall) // 2] | {
        "rounds_wall_seconds": [r["wall_seconds"] for r in colds],
        # Every round must have been one upstream GET and whole responses, not just the median.
        "upstream_blob_gets": max(r["upstream_blob_gets"] for r in colds),
        "ok": min(r["ok"] for r in colds),
        "vm_hwm_kib": max(r["vm_hwm_kib"] for r in colds),
    }
    out["nginx_warm"] = {"wall_seconds": sorted(nginx_walls)[len(nginx_walls) // 2],
                         "rounds_wall_seconds": nginx_walls, "ok": plan.concurrency, "clients": plan.concurrency,
                         "machine_cpu_seconds": statistics.median(nginx_cpus), "rounds_machine_cpu_seconds": nginx_cpus}
    floor = cold_floor(work, upstream, big, root, out["nginx_warm"])
    with running(reference(work / "ref-conc", upstream)) as ref:
        out["reference"] = concurrent_cold(ref.url, upstream, big, plan.concurrency)
        pid = registry_pid(ref)
        if pid is not None:
            out["reference"]["vm_hwm_kib"] = proc_status_kib(pid, "VmHWM")
    for name, r in out.items():
        log(f"{plan.concurrency} concurrent GETs {name}: {r['wall_seconds']:.2f} s, "
            f"{r.get('ok', '-')}/{r['clients']} ok, {r.get('upstream_blob_gets', '-')} upstream GETs"
            + (f", rounds {[round(w, 2) for w in r['rounds_wall_seconds']]}" if "rounds_wall_seconds" in r else ""))
    out["cold_floor"] = floor
    log(f"cold floor {floor['wall_seconds']:.2f} s (nginx {out['nginx_warm']['wall_seconds']:.2f} s, "
        f"{out['nginx_warm']['machine_cpu_seconds']:.2f} CPU s; GET {floor['upstream_get_machine_cpu_seconds']:.2f}, "
        f"hash {floor['sha256_cpu_seconds']:.2f}, write {floor['write_new_file_cpu_seconds']:.2f} CPU s)")
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: user, nice, system,
    irq, softirq; not idle, iowait or time the hypervisor gave to other guests)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cold_floor(work: Path, upstream: Registry, image: ImageInfo, root: Path, nginx: dict[str, Any]) -> dict[str, Any]:
    """The least time any cache can take for the 16 cold GETs on this machine: the warm
    fan-out's CPU (nginx's run, the whole machine) plus what a cold run cannot skip —
    the blob's one upstream GET (the upstream's send and a receive, the whole machine),
    its SHA-256 and its write into new page cache — spread over every core, and never less
    than nginx's own wall time. (Work-conserving bound: it assumes no core ever idles.)"""
    digest, size = image.layer_digests[0], image.layer_sizes[0]
    busy = machine_busy_seconds()
    code, got, _ = fetch(f"{upstream.url}/v2/{BIG_REPO}/blobs/{digest}")
    get_cpu = machine_busy_seconds() - busy
    if code != 200 or got != size:
        raise RuntimeError(f"upstream blob GET: {code}, {got} of {size} bytes")
    data = (root / "v2" / BIG_REPO / "blobs" / digest).read_bytes()
    started = time.thread_time()
    if hashlib.sha256(data).hexdigest() != digest.removeprefix("sha256:"):
        raise RuntimeError("the blob's bytes do not match its digest")
    hash_cpu = time.thread_time() - started
    scratch = work / "floor-write"
    started = time.thread_time()
    with open(scratch, "wb", buffering=0) as file:
        view = memoryview(data)
        for offset in range(0, size, MiB):
            file.write(view[offset : offset + MiB])
    write_cpu = time.thread_time() - started
    scratch.unlink()
    cpus = os.cpu_count() or 1
    wall = max(nginx["wall_seconds"], (nginx["machine_cpu_seconds"] + get_cpu + hash_cpu + write_cpu) / cpus)
    return {"wall_seconds": wall, "cpus": cpus, "upstream_get_machine_cpu_seconds": get_cpu,
            "sha256_cpu_seconds": hash_cpu, "write_new_file_cpu_seconds": write_cpu}


def _link_blob(pg_dir: Path, root: Path, digest: str) -> None:
    blob_dir = root / "v2" / BIG_REPO / "blobs"
    blob_dir.mkdir(parents=True)
    hex_ = digest.removeprefix("sha256:")
    os.link(pg_dir / "cache" / "blobs" / "sha256" / hex_[:2] / hex_, blob_dir / digest)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the report --------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if digits else f"{value:,.0f}"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    blob, man, conc = r["warm"]["blob"], r["warm"]["manifest"], r["concurrent"]
    tag_pg, tag_ref = man["pullgate"]["tag"]["rps"], man["reference"]["tag"]["rps"]
    return {
        "blob_gbps": blob["pullgate"]["gbps"] >= 1.0 and blob["pullgate"]["gbps"] >= 2 * blob["reference"]["gbps"],
        "manifest_tag_rps": tag_pg >= 3000 and tag_pg >= 10 * tag_ref,
        **{f"manifest_{kind}_vs_limit": man["pullgate"][kind]["rps"] >= 0.6 * man["limit"][kind]["rps"]
           for kind in ("tag", "digest")},
        "cold_vs_nginx": conc["pullgate"]["wall_seconds"] <= 1.3 * conc["nginx_warm"]["wall_seconds"],
        "concurrent_upstream_gets": conc["pullgate"]["upstream_blob_gets"] == 1
        and conc["pullgate"]["ok"] == conc["pullgate"]["clients"],
        "rss": conc["pullgate"]["vm_hwm_kib"] < 150 * 1024,
    }


def table(r: dict[str, Any]) -> str:
    plan, blob, man = r["plan"], r["warm"]["blob"], r["warm"]["manifest"]
    cold, conc, ok = r["cold_pull"], r["concurrent"], r["verdicts"]
    mark = {True: "yes", False: "**NO**"}
    pg_c, ref_c = conc["pullgate"], conc["reference"]
    rows: list[tuple[str, ...]] = [
        (f"warm blob GET, {plan['blob_mib']} MiB (GB/s, median of {plan['reps']})",
         _fmt(blob["pullgate"]["gbps"]), _fmt(blob["reference"]["gbps"]), _fmt(blob["upstream"]["gbps"]),
         _fmt(_ratio(blob["pullgate"]["gbps"], blob["reference"]["gbps"])) + "x", ">= 1 GB/s and >= 2x",
         mark[ok["blob_gbps"]]),
        ("... GETs of that blob that went upstream before it was served from the cache",
         *(str(blob[n]["warmup_gets"] - 1) for n in ("pullgate", "reference")), "-", "", "", ""),
    ]
    for kind, target, key in (("tag", ">= 3,000 and >= 10x", "manifest_tag_rps"), ("digest", "", "")):
        vals = [man[n][kind]["rps"] for n in ("pullgate", "reference", "upstream")]
        errs = sum(man[n][kind]["errors"] for n in ("pullgate", "reference", "upstream"))
        rows.append((f"warm manifest by {kind} (req/s, wrk -c{plan['connections']} {plan['wrk_seconds']}s"
                     + (f", {errs} errors" if errs else "") + ")",
                     *(_fmt(v, 0) for v in vals), _fmt(_ratio(vals[0], vals[1]), 1) + "x", target,
                     mark[ok[key]] if key else ""))
        limit = man["limit"][kind]["rps"]
        rounds = plan.get("manifest_rounds", 1)
        rows.append(("... trivial aiohttp handler, same bytes and wrk settings (the framework's limit; req/s)"
                     + (f"; medians of {rounds} alternating runs" if rounds > 1 else ""),
                     _fmt(limit, 0), "-", "-", f"pullgate {_fmt(_ratio(vals[0], limit))}x of it", ">= 0.6x",
                     mark[ok[f"manifest_{kind}_vs_limit"]]))
        if "pullgate_info" in man:
            info = man["pullgate_info"][kind]["rps"]
            rows.append(("... pullgate at log.level info, its default: a JSON request line each (req/s)",
                         _fmt(info, 0), "-", "-", f"{_fmt(_ratio(info, limit))}x of the limit", "", ""))
    layers = "+".join(str(m) for m in plan["cold_layers_mib"])
    rows.append((f"cold pull, skopeo, {layers} MiB layers (s, median of {plan['cold_reps']})",
                 _fmt(cold["pullgate"]["seconds"]), _fmt(cold["reference"]["seconds"]),
                 _fmt(cold["upstream"]["seconds"]),
                 _fmt(_ratio(cold["reference"]["seconds"], cold["pullgate"]["seconds"])) + "x faster", "", ""))
    conc_rounds = plan.get("concurrency_rounds", 1)
    rows.append((f"{plan['concurrency']} concurrent cold GETs of {plan['blob_mib']} MiB (wall s"
                 + (f"; pullgate: median of {conc_rounds}, each on a fresh cache" if conc_rounds > 1 else "") + ")",
                 _fmt(pg_c["wall_seconds"]), _fmt(ref_c["wall_seconds"]), "-",
                 _fmt(_ratio(ref_c["wall_seconds"], pg_c["wall_seconds"])) + "x faster", "", ""))
    ngx = conc["nginx_warm"]["wall_seconds"]
    rows.append((f"... nginx sendfile serving the same {plan['concurrency']} warm (wall s; the fan-out limit"
                 + (f"; median of {conc_rounds}, alternating with pullgate's" if conc_rounds > 1 else "") + ")",
                 _fmt(ngx), "-", "-", f"pullgate cold {_fmt(_ratio(pg_c['wall_seconds'], ngx))}x of it",
                 "<= 1.3x", mark[ok["cold_vs_nginx"]]))
    floor = conc.get("cold_floor")
    if floor is not None:
        rows.append(("... the least any cache could take cold here: nginx's warm CPU + the blob's upstream GET, "
                     "SHA-256 and write into new page cache, over all cores (wall s; "
                     f"GET {_fmt(floor['upstream_get_machine_cpu_seconds'])}, "
                     f"hash {_fmt(floor['sha256_cpu_seconds'])}, write {_fmt(floor['write_new_file_cpu_seconds'])} "
                     f"CPU s on top of nginx's {_fmt(conc['nginx_warm']['machine_cpu_seconds'])})",
                     _fmt(floor["wall_seconds"]), "-", "-", f"{_fmt(_ratio(floor['wall_seconds'], ngx))}x of nginx; "
                     f"pullgate {_fmt(_ratio(pg_c['wall_seconds'], floor['wall_seconds']))}x of this", "", ""))
    rows.append((f"... pullgate serving the same {plan['concurrency']} warm (wall s)",
                 _fmt(conc["pullgate_warm"]["wall_seconds"]), "-", "-", "", "", ""))
    rows.append(("... upstream blob GETs (complete client responses)"
                 + (f"; pullgate: the most in any of its {conc_rounds} rounds" if conc_rounds > 1 else ""),
                 f"{pg_c['upstream_blob_gets']} ({pg_c['ok']}/{pg_c['clients']})",
                 f"{ref_c['upstream_blob_gets']} ({ref_c['ok']}/{ref_c['clients']})", "-", "",
                 "pullgate = 1", mark[ok["concurrent_upstream_gets"]]))
    rows.append(("... peak RSS of the cache process (MiB, VmHWM)",
                 _fmt(pg_c["vm_hwm_kib"] / 1024, 0), _fmt(ref_c.get("vm_hwm_kib", 0) / 1024, 0), "-", "",
                 "pullgate < 150", mark[ok["rss"]]))
    head = ("measurement", "pullgate", "reference (Distribution proxy)", "upstream direct",
            "pullgate vs reference", "target", "met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    def version(args: list[str]) -> str:
        with contextlib.suppress(Exception):
            done = run(args, timeout=10, check=False)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        return "?"
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "docker-registry": version(["docker-registry", "--version"]), "skopeo": version(["skopeo", "--version"]),
            "wrk": version(["wrk", "-v"]), "pullgate_src": str(Pullgate.src),
            "pullgate_commit": version(["git", "-C", str(Pullgate.src), "rev-parse", "--short", "HEAD"])}


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("benchmark exceeded its deadline")


PHASES = ("warm", "cold_pull", "concurrent")


def measure(plan: Plan, work: Path, only: tuple[str, ...] = PHASES) -> dict[str, Any]:
    phases: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    with running(Registry(work / "upstream")) as upstream:
        big, cold = build_and_push(work, upstream, plan)
        log(f"upstream {upstream.url}: {BIG_REPO} ({plan.blob_mib} MiB layer), {COLD_REPO}")
        phases = [("warm", lambda: phase_warm(work, upstream, big, plan)),
                  ("cold_pull", lambda: phase_cold_pull(work, upstream, cold, plan)),
                  ("concurrent", lambda: phase_concurrent(work, upstream, big, plan))]
        return {name: fn() for name, fn in phases if name in only}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs (smoke test, < 1 min)")
    parser.add_argument("--out", type=Path, help="JSON result file (default: bench/results/bench-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, caches) for inspection")
    parser.add_argument("--pullgate-src", type=Path, default=ROOT,
                        help="directory holding the proxy/ package to run (default: this checkout)")
    parser.add_argument("--phase", action="append", choices=PHASES,
                        help="run only this phase (repeatable; default: all) -- for A/B runs of one change")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    Pullgate.src = args.pullgate_src.resolve()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(plan.deadline)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pullgate-bench-"))
    try:
        result: dict[str, Any] = {"mode": "quick" if args.quick else "full", "plan": plan.__dict__,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": environment()}
        result.update(measure(plan, work, tuple(args.phase or PHASES)))
    finally:
        signal.alarm(0)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    whole = all(name in result for name in PHASES)
    if whole:
        result["verdicts"] = verdicts(result)
    out = args.out or ROOT / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    # One phase alone has no table (its verdicts compare phases): its log lines and JSON say it.
    print(table(result) if whole else json.dumps({k: result[k] for k in PHASES if k in result}, indent=1))
    print(f"\n{result['mode']} run, {result['seconds']} s, {result['env']['cpus']} CPUs, loopback; "
          f"GB = 10^9 bytes; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
