#!/usr/bin/env python3
"""The storm's pulling nodes: many HTTP clients driven by a few asyncio processes.

Each node opens one keep-alive connection, GETs the manifest by tag, then every layer in
turn, and counts what it received; the manifest is always hashed against its digest, and
every ``sample_every``-th node also hashes each layer (hashing all would measure the
client). The nodes run in one asyncio loop per core, each loop in a process of its own.

Why not 200 threads (what the storm benchmark first used): with one Python process of 200
client threads, every body read releases and re-takes the GIL, and the kernel wakes dozens
of threads per handoff only to put them back to sleep (``perf sched``: bursts of 100+ runs
of ~8 us each; pullgate's event loop kept runnable-but-waiting up to 21 ms behind them, an
idle asyncio loop in another process woken 31-127 ms late at p99). That is the load
generator measuring itself. On a cluster every node has its own CPU; a few event loops
doing non-blocking ``recv_into`` are the closest stand-in on one machine. They run at
pullgate's own CPU priority unless asked otherwise (``nice``).

As a library: ``run(job, processes, nice)``; as a child (``python3 nodes.py``): reads one
JSON job line on stdin, prints ``ready``, waits for ``go``, pulls, prints one JSON list of
results (``node``, ``bytes``, ``ok``, ``seconds``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
BUFFER = 4 * MiB  # bytes per recv_into, as bench_mirror.fetch
TIMEOUT = 600.0


@dataclass(frozen=True)
class Job:
    host: str
    port: int
    repository: str
    tag: str
    accept: str
    manifest_digest: str
    layers: list[tuple[str, int]]
    nodes: list[int]  # node numbers this process runs
    sample_every: int


class Fail(Exception):
    pass


async def _request(sock: socket.socket, job: Job, path: str, sink: _Sink) -> int:
    """One GET on the node's connection; the body goes to ``sink``; returns the status."""
    loop = asyncio.get_running_loop()
    head = f"GET {path} HTTP/1.1\r\nHost: {job.host}:{job.port}\r\nAccept: {job.accept}\r\n\r\n"
    await loop.sock_sendall(sock, head.encode())
    received = b""
    while b"\r\n\r\n" not in received:
        more = await loop.sock_recv(sock, 65536)
        if not more:
            raise Fail("connection closed in the headers")
        received += more
    header, body = received.split(b"\r\n\r\n", 1)
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    length = next((int(v) for k, v in fields.items() if k.strip().lower() == "content-length"), None)
    if length is None:
        raise Fail(f"{path}: no Content-Length")
    sink.take(body)
    got = len(body)
    while got < length:
        n = await loop.sock_recv_into(sock, sink.buffer[: min(len(sink.buffer), length - got)])
        if n == 0:
            raise Fail(f"{path}: connection closed after {got} of {length} bytes")
        sink.take(sink.buffer[:n])
        got += n
    return status


class _Sink:
    """Where a body goes: counted, and hashed when asked."""

    def __init__(self, buffer: memoryview, *, hash_it: bool) -> None:
        self.buffer, self.count = buffer, 0
        self._hasher = hashlib.sha256() if hash_it else None

    def take(self, data: bytes | memoryview) -> None:
        self.count += len(data)
        if self._hasher is not None:
            self._hasher.update(data)

    def digest(self) -> str:
        assert self._hasher is not None
        return f"sha256:{self._hasher.hexdigest()}"


async def _node(job: Job, number: int, shared: memoryview) -> dict[str, Any]:
    """One node's pull: manifest by tag (always hashed), then each layer."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    verify = number % job.sample_every == 0
    # A node that hashes needs its own buffer; the others share one (the loop runs one
    # recv_into at a time and their bytes are only counted).
    buffer = memoryview(bytearray(BUFFER)) if verify else shared
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    ok, got = True, 0
    try:
        async with asyncio.timeout(TIMEOUT):
            await loop.sock_connect(sock, (job.host, job.port))
            manifest = _Sink(buffer, hash_it=True)
            status = await _request(sock, job, f"/v2/{job.repository}/manifests/{job.tag}", manifest)
            ok = status == 200 and manifest.digest() == job.manifest_digest
            for digest, size in job.layers:
                sink = _Sink(buffer, hash_it=verify)
                status = await _request(sock, job, f"/v2/{job.repository}/blobs/{digest}", sink)
                ok = ok and status == 200 and sink.count == size and (not verify or sink.digest() == digest)
                got += sink.count
    except (OSError, TimeoutError, Fail, ValueError, IndexError):  # IndexError: a malformed status line
        ok = False
    finally:
        sock.close()
    return {"node": number, "bytes": got, "ok": ok, "seconds": time.monotonic() - started}


async def _run_job(job: Job) -> list[dict[str, Any]]:
    shared = memoryview(bytearray(BUFFER))
    return list(await asyncio.gather(*(_node(job, n, shared) for n in job.nodes)))


def run(job: Job, processes: int, nice: int) -> tuple[float, list[dict[str, Any]]]:
    """Run ``job.nodes`` spread over ``processes`` child processes at ``nice``; returns
    (wall seconds from the common start, per-node results)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    children = []
    for part in range(processes):
        share = Job(**{**asdict(job), "nodes": job.nodes[part::processes]})
        child = subprocess.Popen(me, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: os.nice(nice))  # before exec: no threads yet
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(asdict(share)) + "\n")
        child.stdin.flush()
        children.append(child)
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a node process did not start")
    started = time.monotonic()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.close()
    results: list[dict[str, Any]] = []
    for child in children:
        assert child.stdout is not None
        out = child.stdout.read()  # the nodes stop by themselves (TIMEOUT each)
        child.wait(timeout=60)
        results.extend(json.loads(out))
    return time.monotonic() - started, results


def main() -> None:
    raw = json.loads(sys.stdin.readline())
    job = Job(**{**raw, "layers": [tuple(pair) for pair in raw["layers"]]})
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    print(json.dumps(asyncio.run(_run_job(job))))


if __name__ == "__main__":
    main()
