"""The active policy set: loaded from a file or directory, reloaded when the files change.

Reload polls file metadata (mtime, size, inode) rather than using inotify: it works the same
on every filesystem, including Kubernetes ConfigMap volumes, where an update swaps a
``..data`` symlink (dot entries are skipped; ``stat`` follows the visible symlinks). An
invalid set is rejected with its error logged and kept for ``/readyz``; the last good set
stays active.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from proxy.errors import NameInvalid
from proxy.oci.reference import ImageReference, normalize_repository, split_host
from proxy.ops.filewatch import stamp
from proxy.ops.metrics import Metrics
from proxy.ops.supervisor import supervised
from proxy.policy.document import Policy, PolicyInvalid, load_file
from proxy.trust.trustroot import RootHolder

POLICY_SUFFIXES = (".yaml", ".yml")
Signature = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: tuple[Policy, ...] = ()
    files: tuple[Path, ...] = ()
    # Hosts that ``rewriteRegistry`` moves images to: an image already moved is judged (and
    # re-mutated) as the original, so mutation stays idempotent.
    mirror_hosts: frozenset[str] = field(default=frozenset())

    @classmethod
    def of(cls, policies: tuple[Policy, ...], files: tuple[Path, ...] = ()) -> PolicySet:
        hosts = frozenset(p.rewrite_registry for p in policies if p.rewrite_registry)
        return cls(policies, files, hosts)

    def matching(self, ref: ImageReference, namespace: str) -> tuple[Policy, ...]:
        return tuple(p for p in self.policies if p.applies(ref, namespace))

    def canonical(self, ref: ImageReference) -> ImageReference:
        """``mirror:5000/docker.io/library/nginx`` -> ``docker.io/library/nginx`` (the path
        on the mirror read as a reference: ``mirror:5000/docker.io/nginx`` is the same image)."""
        if ref.registry not in self.mirror_hosts:
            return ref
        try:
            host, rest = split_host(ref.repository)
            if host is None:
                return ref
            return ImageReference(host, normalize_repository(host, rest), ref.tag, ref.digest)
        except NameInvalid:  # not a registry path on the mirror: judged as the mirror's own image
            return ref


def policy_files(path: Path) -> tuple[Path, ...]:
    if path.is_dir():
        return tuple(
            sorted(
                p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
        )
    if path.is_file():
        return (path,)
    raise PolicyInvalid(f"{path}: no such policy file or directory")


def load_policies(path: Path, roots: RootHolder | None = None) -> PolicySet:
    """Load every policy under ``path``; raises ``PolicyInvalid`` on the first bad file.
    ``roots``: the default Sigstore trusted root for keyless rules (default: the shipped one)."""
    files = policy_files(path)
    policies: list[Policy] = []
    seen: dict[str, Policy] = {}
    for file in files:
        for policy in load_file(file, roots):
            if policy.name in seen:
                raise PolicyInvalid(
                    f"{policy.source}: metadata.name: policy {policy.name!r} is already "
                    f"defined in {seen[policy.name].source}"
                )
            seen[policy.name] = policy
            policies.append(policy)
    return PolicySet.of(tuple(policies), files)


def signature(path: Path) -> Signature:
    """What changes when a policy file is added, removed or rewritten."""
    try:
        files = policy_files(path)
    except (PolicyInvalid, OSError):
        return ()
    return tuple((str(file), *stamp(file)) for file in files)


class PolicyStore:
    """Holds the active ``PolicySet`` (``None`` until one loads) and reloads it on change."""

    def __init__(
        self,
        path: Path | None,
        metrics: Metrics,
        logger: FilteringBoundLogger,
        *,
        interval: float = 2.0,
        roots: RootHolder | None = None,
    ) -> None:
        self.path = path
        self.roots = roots if roots is not None else RootHolder()
        self.metrics = metrics
        self.logger = logger
        self.interval = interval
        metrics.declare_policies()
        self.current: PolicySet | None = PolicySet() if path is None else None
        self.error: str | None = None
        self._signature: Signature | None = None

    @property
    def ready(self) -> bool:
        return self.current is not None

    async def reload(self) -> bool:
        """Load the files now; on error keep the last good set. True when a set loaded."""
        if self.path is None:
            return True
        self._signature = await asyncio.to_thread(signature, self.path)
        try:
            loaded = await asyncio.to_thread(load_policies, self.path, self.roots)
        except PolicyInvalid as exc:
            self.error = exc.message
            self.metrics.policy_reloads.labels(result="error").inc()
            self.logger.error(
                "policies_invalid",
                path=str(self.path),
                error=exc.message,
                keeping=len(self.current.policies) if self.current else None,
            )
            return False
        self.current, self.error = loaded, None
        self.metrics.policy_reloads.labels(result="ok").inc()
        self.metrics.policies_loaded.set(len(loaded.policies))
        self.logger.info(
            "policies_loaded", path=str(self.path), count=len(loaded.policies), files=[str(f) for f in loaded.files]
        )
        return True

    async def watch(self) -> None:
        """Poll for changes forever (run it as a task)."""
        assert self.path is not None
        while True:
            await asyncio.sleep(self.interval)
            if await asyncio.to_thread(signature, self.path) != self._signature:
                await self.reload()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PolicyStore]:
        """Load once, then watch until the context exits (for ``cleanup_ctx``)."""
        if self.path is None:
            self.metrics.policies_loaded.set(0)
            yield self
            return
        await self.reload()
        async with supervised(self.metrics, "policy_watch", self.watch, self.logger):
            yield self
