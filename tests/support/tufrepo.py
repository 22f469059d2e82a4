"""A real TUF repository on disk, made with python-tuf's metadata API (``tuf.api.metadata``)
and ed25519 keys (securesystemslib's ``CryptoSigner``): root, targets, snapshot and
timestamp, each signed by its own key, in the layout Sigstore's repository uses (metadata
at the top, targets under ``targets/``; no consistent snapshots, so names stay plain).

Tests serve ``directory`` over loopback and point ``proxy.trust.tufroot`` at it; they can
tamper with it afterwards (``write_target`` without signing, expired timestamps, rotations).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


def _in(days: float) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


class TufRepository:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "targets").mkdir(parents=True, exist_ok=True)
        self.signers: dict[str, Signer] = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        self.root = Metadata(Root(expires=_in(365), consistent_snapshot=False))
        for role, signer in self.signers.items():
            self.root.signed.add_key(signer.public_key, role)
        self.targets = Metadata(Targets(expires=_in(30)))
        self.snapshot = Metadata(Snapshot(expires=_in(7)))
        self.timestamp = Metadata(Timestamp(expires=_in(1)))
        self._write_root()

    @property
    def root_json(self) -> bytes:
        """Version 1 of root.json: the anchor a client starts from."""
        return (self.directory / "1.root.json").read_bytes()

    def publish(self, name: str, data: bytes, *, timestamp_expires: datetime | None = None) -> None:
        """Sign ``data`` as target ``name`` and write new targets, snapshot and timestamp."""
        self.write_target(name, data)
        self.targets.signed.targets[name] = TargetFile.from_data(name, data)
        self.targets.signed.version += 1
        self._write(self.targets, Targets.type, "targets.json")
        self.snapshot.signed.meta["targets.json"] = MetaFile(self.targets.signed.version)
        self.snapshot.signed.version += 1
        snapshot_bytes = self._write(self.snapshot, Snapshot.type, "snapshot.json")
        self.timestamp.signed.snapshot_meta = MetaFile(
            self.snapshot.signed.version, length=len(snapshot_bytes), hashes={"sha256": _sha256(snapshot_bytes)}
        )
        self.timestamp.signed.version += 1
        self.timestamp.signed.expires = timestamp_expires or _in(1)
        self._write(self.timestamp, Timestamp.type, "timestamp.json")

    def write_target(self, name: str, data: bytes) -> None:
        """Put a file in ``targets/`` without signing it (tests tamper with this)."""
        (self.directory / "targets" / name).write_bytes(data)

    def rotate(self, role: str) -> None:
        """A new key for ``role``: root version N+1 signed by the old root key and the new one."""
        old = self.signers[role]
        new = CryptoSigner.generate_ed25519()
        self.root.signed.revoke_key(old.public_key.keyid, role)
        self.root.signed.add_key(new.public_key, role)
        self.signers[role] = new
        self.root.signed.version += 1
        self.root.signatures.clear()
        self.root.sign(new if role == Root.type else self.signers[Root.type], append=True)
        if role == Root.type:
            self.root.sign(old, append=True)  # the previous root's threshold vouches for the new one
        self._write_file(self.root, f"{self.root.signed.version}.root.json")

    def _write_root(self) -> None:
        self.root.sign(self.signers[Root.type])
        self._write_file(self.root, f"{self.root.signed.version}.root.json")

    def _write(self, md: Metadata, role: str, filename: str) -> bytes:  # type: ignore[type-arg]
        md.sign(self.signers[role])
        return self._write_file(md, filename)

    def _write_file(self, md: Metadata, filename: str) -> bytes:  # type: ignore[type-arg]
        data = md.to_bytes(JSONSerializer(compact=False))
        (self.directory / filename).write_bytes(data)
        return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
