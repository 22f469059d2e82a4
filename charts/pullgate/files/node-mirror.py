"""Point this node's containerd at the pullgate mirror: write one ``hosts.toml`` per mirrored
registry under containerd's ``config_path`` (https://github.com/containerd/containerd/blob/main/docs/hosts.md),
keep them current, and remove them when the pod stops.

Run by the chart's node-mirror DaemonSet with the pullgate image (stdlib only). containerd
re-reads hosts.toml on every pull: no restart. It tries the mirror first and falls back to
``server`` (the registry itself) when the mirror is unreachable, so a mirror outage slows
pulls down but never breaks them.

Environment:
  HOSTS_DIR        containerd's config_path as mounted in this container
  REGISTRIES       JSON list of {"registry": "docker.io", "server": "https://registry-1.docker.io"}
  MIRROR_ENDPOINT  the mirror URL to write, e.g. http://10.96.0.50:5000; or else
  MIRROR_SERVICE   the Service's DNS name, resolved here to its ClusterIP (nodes do not use
  MIRROR_PORT      cluster DNS, but reach ClusterIPs), with this port
  OVERWRITE        "true": replace hosts.toml files written by someone else (kept as .orig)
  CLEANUP          "true": remove what was written when the pod stops (SIGTERM)
  RESYNC_SECONDS   how often to re-resolve and rewrite (default 60)
``--once`` writes and exits (for tests and one-shot use).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

MARKER = "# managed-by: pullgate-node-mirror"
HOSTS_FILE = "hosts.toml"


def log(event: str, **fields: object) -> None:
    fields.update(event=event, ts=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(fields, sort_keys=True), flush=True)


def env_flag(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes")


def mirror_endpoint() -> str:
    explicit = os.environ.get("MIRROR_ENDPOINT", "").strip().rstrip("/")
    if explicit:
        return explicit
    service, port = os.environ["MIRROR_SERVICE"], int(os.environ.get("MIRROR_PORT", "5000"))
    infos = socket.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    address = str(sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0][4][0])
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def reachable(endpoint: str) -> bool:
    """Does the mirror answer at all? A liveness check, not a trust decision: containerd
    verifies an https mirror's certificate itself, against the node's trust store. 401 counts
    (access control on), so does 200."""
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=unverified)
    )
    try:
        with opener.open(f"{endpoint}/v2/", timeout=3) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except (urllib.error.URLError, OSError, ValueError):
        return False


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for URLs


def render(server: str, endpoint: str) -> str:
    return (
        f"{MARKER} (mirror {endpoint}); removed when the node-mirror pod stops.\n"
        f"server = {toml_string(server)}\n"
        f"\n"
        f"[host.{toml_string(endpoint)}]\n"
        f'  capabilities = ["pull", "resolve"]\n'
    )


def ours(path: Path) -> bool:
    try:
        return path.read_text().startswith(MARKER)
    except OSError:
        return False


def write(hosts_dir: Path, registry: str, server: str, endpoint: str, overwrite: bool) -> None:
    directory = hosts_dir / registry
    path = directory / HOSTS_FILE
    content = render(server, endpoint)
    if path.exists() and not ours(path):
        if not overwrite:
            log(
                "hosts_toml_kept", registry=registry, path=str(path), reason="not written by pullgate (OVERWRITE=false)"
            )
            return
        backup = path.with_name(HOSTS_FILE + ".orig")
        if not backup.exists():
            path.rename(backup)
            log("hosts_toml_backed_up", registry=registry, backup=str(backup))
    if path.exists() and path.read_text() == content:
        return
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    temp = directory / f".{HOSTS_FILE}.pullgate-tmp"
    temp.write_text(content)
    temp.chmod(0o644)
    os.replace(temp, path)  # atomic: containerd never reads half a file
    log("hosts_toml_written", registry=registry, path=str(path), endpoint=endpoint, server=server)


def remove(hosts_dir: Path, registry: str) -> None:
    path = hosts_dir / registry / HOSTS_FILE
    if ours(path):
        path.unlink()
        backup = path.with_name(HOSTS_FILE + ".orig")
        if backup.exists():
            backup.rename(path)
        log("hosts_toml_removed", registry=registry, path=str(path), restored=path.exists())


def sync(hosts_dir: Path, registries: list[dict[str, str]], overwrite: bool) -> bool:
    try:
        endpoint = mirror_endpoint()
    except (OSError, KeyError) as exc:
        log("mirror_unresolved", error=str(exc))
        return False
    if not reachable(endpoint):
        # Never point a node at a mirror that does not answer; files already written stay
        # (containerd falls back to the registry on its own during a blip).
        log("mirror_unreachable", endpoint=endpoint)
        return False
    for entry in registries:
        write(hosts_dir, entry["registry"], entry["server"], endpoint, overwrite)
    return True


def main(argv: list[str]) -> int:
    hosts_dir = Path(os.environ["HOSTS_DIR"])
    registries = json.loads(os.environ["REGISTRIES"])
    overwrite, cleanup = env_flag("OVERWRITE", False), env_flag("CLEANUP", True)
    interval = float(os.environ.get("RESYNC_SECONDS", "60"))
    if "--once" in argv:
        return 0 if sync(hosts_dir, registries, overwrite) else 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log("node_mirror_started", hosts_dir=str(hosts_dir), registries=[r["registry"] for r in registries])
    while not stop.is_set():
        done = sync(hosts_dir, registries, overwrite)
        stop.wait(interval if done else min(interval, 5.0))
    if cleanup:
        for entry in registries:
            remove(hosts_dir, entry["registry"])
    log("node_mirror_stopped", cleanup=cleanup)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
