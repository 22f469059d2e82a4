"""The TUF client for Sigstore's trusted root: fetch ``trusted_root.json`` from a TUF
repository (Sigstore's public-good one is https://tuf-repo-cdn.sigstore.dev), anchored on a
TUF ``root.json`` we already trust — by default Sigstore's, shipped as package data
(``proxy/trust/data/sigstore-tuf-root.json``, the copy sigstore-python 4.5.1 embeds).

Why TUF and not a plain download: the repository signs what it serves (root, timestamp,
snapshot, targets; the ``tuf`` library's ``ngclient`` runs the client workflow of
https://theupdateframework.github.io/specification/latest/#detailed-client-workflow), so a
mirror or a network attacker can neither swap the file, roll it back, nor freeze it on an
old one; key rotations arrive as new ``root.json`` versions signed by the old keys.

Synchronous (the ``tuf`` library is): callers run it in a thread. Every network read is
bounded by ``timeout`` (urllib3's connect and read timeouts). Offline, ``cached()`` checks the
metadata and target a previous fetch left in ``cache_dir`` against the anchor again, so a
restart without network keeps the refreshed root.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from tuf.api.exceptions import DownloadError, RepositoryError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.ngclient.updater import Updater
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from proxy.errors import ConfigError, UpstreamError
from proxy.trust.trustroot import TrustedRoot

TARGET = "trusted_root.json"
_MAX_ROOT_ROTATIONS = 32  # as tuf.ngclient's UpdaterConfig.max_root_rotations
_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


class TrustRootRefreshFailed(UpstreamError):
    """The TUF repository could not be read, or what it served did not verify."""

    code, status = "TRUST_ROOT_REFRESH_FAILED", 502


def shipped_tuf_root() -> bytes:
    """Sigstore public-good TUF ``root.json`` (version 15), shipped as package data."""
    return resources.files("proxy.trust").joinpath("data/sigstore-tuf-root.json").read_bytes()


def load_anchor(path: Path | None) -> bytes:
    """The TUF root to trust first: ``path``, or the shipped Sigstore one. It must parse as
    root metadata signed by its own keys (a typo'd file fails at startup, not at refresh)."""
    if path is None:
        return shipped_tuf_root()
    try:
        data = path.read_bytes()
        root = Metadata[Root].from_bytes(data)
        root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
    except OSError as exc:
        raise ConfigError(f"trust.tuf.root: cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, KeyError, RepositoryError) as exc:  # tuf's DeserializationError is a ValueError
        raise ConfigError(f"trust.tuf.root: {path} is not a TUF root.json signed by its own keys: {exc}") from exc
    return data


@dataclass(frozen=True, slots=True)
class TufRootClient:
    url: str  # the repository: metadata at URL/, targets at URL/targets/ (Sigstore's layout)
    anchor: bytes  # root.json trusted first
    cache_dir: Path
    timeout: float  # seconds, each network read

    @property
    def name(self) -> str:
        return f"{TARGET} from {self.url} (TUF)"

    def fetch(self) -> TrustedRoot:
        """Refresh the metadata and fetch ``trusted_root.json`` if it changed (network)."""
        try:
            updater = self._updater()
            info = updater.get_targetinfo(TARGET)
            if info is None:
                raise TrustRootRefreshFailed(f"{self.url}: the repository has no {TARGET} target")
            path = updater.find_cached_target(info) or updater.download_target(info)
            data = Path(path).read_bytes()
        except (RepositoryError, DownloadError, OSError, ValueError) as exc:
            raise TrustRootRefreshFailed(f"{self.url}: {_describe(exc)}") from exc
        return self._parse(data)

    def cached(self) -> TrustedRoot | None:
        """The root a previous ``fetch`` left in ``cache_dir``, checked offline against the
        anchor: root versions chained from it, timestamp/snapshot/targets signed by the last
        root and agreeing on versions and hashes, the file matching the signed length and
        hashes. Expiry is not checked: those dates stop a repository (or attacker) from
        freezing a client that is online; a restart without network keeps what was accepted
        then, rather than fall back to the older shipped root. None when nothing is cached
        (or ``trusted_root.json`` is not a top-level target, as it is in Sigstore's repository:
        delegations are followed online only)."""
        meta = self._metadata_dir()
        if not (meta / "targets.json").exists():
            return None
        try:
            root = _root_chain(self.anchor, meta / "root_history")
            timestamp = _signed_by(root, meta / "timestamp.json", Timestamp)
            snapshot_bytes = (meta / "snapshot.json").read_bytes()
            timestamp.snapshot_meta.verify_length_and_hashes(snapshot_bytes)
            snapshot = _signed_by(root, meta / "snapshot.json", Snapshot, snapshot_bytes)
            targets_bytes = (meta / "targets.json").read_bytes()
            targets_meta = snapshot.meta[f"{Targets.type}.json"]
            targets_meta.verify_length_and_hashes(targets_bytes)
            targets = _signed_by(root, meta / "targets.json", Targets, targets_bytes)
            if snapshot.version != timestamp.snapshot_meta.version or targets.version != targets_meta.version:
                raise RepositoryError("metadata versions disagree")
            info = targets.targets.get(TARGET)
            if info is None:
                return None
            data = (self._target_dir() / quote(TARGET, "")).read_bytes()
            info.verify_length_and_hashes(data)
        except (RepositoryError, OSError, ValueError, KeyError) as exc:
            raise TrustRootRefreshFailed(f"{self.cache_dir}: cached TUF metadata: {_describe(exc)}") from exc
        return self._parse(data)

    def _parse(self, data: bytes) -> TrustedRoot:
        try:
            return TrustedRoot.from_json(data, self.name)
        except ConfigError as exc:
            raise TrustRootRefreshFailed(f"{self.url}: {exc.message}") from exc

    def _updater(self) -> Updater:
        self._metadata_dir().mkdir(parents=True, exist_ok=True)
        fetcher = Urllib3Fetcher(socket_timeout=max(1, math.ceil(self.timeout)), app_user_agent="pullgate")
        return Updater(
            metadata_dir=str(self._metadata_dir()),
            metadata_base_url=f"{self.url}/",
            target_dir=str(self._target_dir()),
            target_base_url=f"{self.url}/targets/",
            fetcher=fetcher,
            bootstrap=self.anchor,  # always the anchor: cached newer roots are re-verified from it
        )

    def _metadata_dir(self) -> Path:
        return self.cache_dir / "metadata"

    def _target_dir(self) -> Path:
        return self.cache_dir / "targets"


def _root_chain(anchor: bytes, history: Path) -> Root:
    """The newest root in ``history`` reachable from ``anchor``: each version N+1 signed by
    a threshold of version N's root keys and of its own (TUF spec 5.3.4-5.3.5)."""
    trusted = Metadata[Root].from_bytes(anchor).signed
    for version in range(trusted.version + 1, trusted.version + 1 + _MAX_ROOT_ROTATIONS):
        try:
            data = (history / f"{version}.root.json").read_bytes()
        except FileNotFoundError:
            break
        new = Metadata[Root].from_bytes(data)
        trusted.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        if new.signed.version != version:
            raise RepositoryError(f"{version}.root.json claims version {new.signed.version}")
        trusted = new.signed
    return trusted


def _signed_by(root: Root, path: Path, kind: type[_S], data: bytes | None = None) -> _S:
    raw = path.read_bytes() if data is None else data
    md = Metadata[_S].from_bytes(raw)
    if not isinstance(md.signed, kind):
        raise RepositoryError(f"{path.name}: expected {kind.type} metadata")
    root.verify_delegate(kind.type, md.signed_bytes, md.signatures)
    return md.signed


def _describe(exc: Exception) -> str:
    """The tuf exception's class says what failed (several carry no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
