"""A private containerd 1.6 (run as root) and ``ctr`` as the real runtime client.

Everything lives under a temp dir: root, state, sockets. CRI and the plugins that want
host paths or kernel features are disabled; the ``native`` snapshotter unpacks by plain
copying. The metadata store uses ``content_sharing_policy = "isolated"``, so a pull in a
fresh namespace (``new_namespace()``) downloads every blob again even though another
namespace already holds it; in the default "shared" policy containerd would skip them.

Mirrors are configured the way a kubelet node would be: ``hosts.toml`` under a hosts dir
(https://github.com/containerd/containerd/blob/main/docs/hosts.md). When the mirror host
differs from the image's registry, containerd adds ``?ns=<registry>`` to every request.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.procs import Completed, arun, run, start_daemon, stop_daemon, wait_until

START_TIMEOUT = 15.0
PULL_TIMEOUT = 120.0
CTR_TIMEOUT = 30.0
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",  # would create /opt/containerd
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
)
_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


def registry_of(ref: str) -> str:
    """The registry host of a fully qualified reference ("docker.io/library/x:1")."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def default_server(registry_host: str) -> str:
    return "https://registry-1.docker.io" if registry_host == "docker.io" \
        else f"https://{registry_host}"


def hosts_toml(server: str, mirror_url: str | None, *,
               capabilities: Sequence[str] = ("pull", "resolve"),
               ca_file: Path | None = None, headers: Mapping[str, str] | None = None) -> str:
    """``headers`` go on every request to the mirror, e.g. ``Authorization = "Basic ..."``
    (https://github.com/containerd/containerd/blob/main/docs/hosts.md#header-fields-in-the-toml-table-format)."""
    lines = [f'server = "{server}"']
    if mirror_url is not None:
        caps = ", ".join(f'"{c}"' for c in capabilities)
        lines += ["", f'[host."{mirror_url}"]', f"  capabilities = [{caps}]"]
        if ca_file is not None:
            lines.append(f'  ca = "{ca_file}"')
        if headers:
            lines.append(f'  [host."{mirror_url}".header]')
            # TOML basic strings share JSON's escapes for what headers can hold.
            lines += [f"    {name} = {json.dumps(value)}" for name, value in headers.items()]
    return "\n".join(lines) + "\n"


class Containerd:
    """``containerd --config`` in its own session; ``ctr`` commands against its socket."""

    def __init__(self, workdir: Path, *, namespace: str = "pullgate-test") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.socket = workdir / "containerd.sock"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)
        self.config_path.write_text(_CONFIG.format(
            root=workdir / "root", state=workdir / "state", sock=self.socket,
            disabled=", ".join(f'"{p}"' for p in _DISABLED_PLUGINS)))

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Containerd:
        self._proc = start_daemon(["containerd", "--config", str(self.config_path)],
                                  stdout=self.log_path, stderr=self.log_path)
        wait_until(self._answers, timeout=START_TIMEOUT, what="containerd", proc=self._proc,
                   log=self.log_path)
        return self

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.ctr("version", check=False, timeout=5.0).returncode == 0

    def stop(self) -> None:
        if self._proc is not None:
            stop_daemon(self._proc, grace=10.0)
            self._proc = None

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ctr ---------------------------------------------------------------------------
    def _ctr_args(self, args: Sequence[str], namespace: str | None) -> list[str]:
        return ["ctr", "-a", str(self.socket), "-n", namespace or self.namespace, *args]

    def ctr(self, *args: str, namespace: str | None = None, check: bool = True,
            timeout: float = CTR_TIMEOUT) -> Completed:
        return run(self._ctr_args(args, namespace), timeout=timeout, check=check)

    def new_namespace(self) -> str:
        """A namespace with no content yet: pulling there fetches every blob."""
        return f"{self.namespace}-{next(self._counter)}"

    def write_hosts(self, registry_host: str, mirror_url: str | None, *,
                    server: str | None = None, capabilities: Sequence[str] = ("pull", "resolve"),
                    ca_file: Path | None = None, headers: Mapping[str, str] | None = None) -> Path:
        """A fresh hosts dir holding ``<registry_host>/hosts.toml``; returns the dir."""
        hosts_dir = self.workdir / f"hosts-{next(self._counter)}"
        (hosts_dir / registry_host).mkdir(parents=True)
        (hosts_dir / registry_host / "hosts.toml").write_text(hosts_toml(
            server or default_server(registry_host), mirror_url, capabilities=capabilities,
            ca_file=ca_file, headers=headers))
        return hosts_dir

    def pull_args(self, ref: str, mirror_url: str | None, *, registry_host: str | None,
                  platform: str | None, server: str | None, namespace: str | None,
                  extra: Sequence[str], headers: Mapping[str, str] | None = None) -> list[str]:
        hosts_dir = self.write_hosts(registry_host or registry_of(ref), mirror_url,
                                     server=server, headers=headers)
        args = ["images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native"]
        if platform is not None:
            args += ["--platform", platform]
        return self._ctr_args([*args, *extra, ref], namespace)

    def pull(self, ref: str, mirror_url: str | None = None, *, registry_host: str | None = None,
             platform: str | None = None, server: str | None = None,
             namespace: str | None = None, extra: Sequence[str] = (),
             timeout: float = PULL_TIMEOUT) -> str:
        """``ctr images pull`` (fetch + unpack) via ``mirror_url``; returns the image's
        target digest. ``ref`` must be fully qualified (``docker.io/library/x:1``);
        without a mirror, ``server`` (e.g. ``http://127.0.0.1:PORT``) is contacted."""
        run(self.pull_args(ref, mirror_url, registry_host=registry_host, platform=platform,
                           server=server, namespace=namespace, extra=extra), timeout=timeout)
        return self.image_digest(ref, namespace=namespace)

    async def apull(self, ref: str, mirror_url: str | None = None, *,
                    registry_host: str | None = None, platform: str | None = None,
                    server: str | None = None, namespace: str | None = None,
                    extra: Sequence[str] = (), timeout: float = PULL_TIMEOUT,
                    headers: Mapping[str, str] | None = None) -> str:
        """``pull`` without blocking the event loop (for a mirror running in the test);
        ``headers`` go into the mirror's hosts.toml entry (e.g. ``Authorization``)."""
        await arun(self.pull_args(ref, mirror_url, registry_host=registry_host,
                                  platform=platform, server=server, namespace=namespace,
                                  extra=extra, headers=headers), timeout=timeout)
        result = await arun(self._ctr_args(["images", "ls"], namespace), timeout=CTR_TIMEOUT)
        return _digest_from_listing(result.stdout, ref)

    def image_digest(self, ref: str, *, namespace: str | None = None) -> str:
        return _digest_from_listing(self.ctr("images", "ls", namespace=namespace).stdout, ref)

    def content_digests(self, *, namespace: str | None = None) -> set[str]:
        """Every blob (indexes, manifests, configs, layers) the namespace holds."""
        out = self.ctr("content", "ls", "-q", namespace=namespace).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def content_get(self, digest: str, *, namespace: str | None = None) -> bytes:
        return self.ctr("content", "get", digest, namespace=namespace).stdout_bytes

    def remove(self, ref: str, *, namespace: str | None = None) -> None:
        """Delete the image and wait for garbage collection of its content."""
        self.ctr("images", "rm", "--sync", ref, namespace=namespace)


def _digest_from_listing(listing: str, ref: str) -> str:
    # `ctr images ls`: REF TYPE DIGEST SIZE(2 words) PLATFORMS LABELS
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            return fields[2]
    raise AssertionError(f"{ref} not in `ctr images ls`:\n{listing}")
