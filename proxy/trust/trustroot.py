"""Sigstore trust roots: the ``trusted_root.json`` document (protobuf-specs
``dev.sigstore.trustroot.v1.TrustedRoot``) that says which Fulcio certificate authorities,
transparency logs (Rekor v1 and v2), certificate-transparency logs and RFC 3161 timestamp
authorities keyless verification trusts, each for a window of time.

The Sigstore public-good root ships inside the package (``proxy/trust/data/trusted_root.json``,
the copy sigstore-python embeds) and is the default: verification is offline, which
air-gapped clusters need. A private Sigstore deployment names its own file.

Spec: https://github.com/sigstore/protobuf-specs/blob/main/protos/sigstore_trustroot.proto
(``logId.keyId`` is the SHA-256 of the log key's DER SPKI for Rekor and CT logs alike).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509

from proxy.errors import ConfigError, SignatureInvalid
from proxy.trust.documents import json_object
from proxy.trust.keys import VerifyingKey, load_der_public_key

TRUSTED_ROOT_MEDIA_TYPES = frozenset(
    {
        "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "application/vnd.dev.sigstore.trustedroot.v0.2+json",
    }
)
DEFAULT_NAME = "sigstore public-good (shipped)"


class TrustRootInvalid(ConfigError):
    """A trusted root file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Window:
    """When a key or CA may be used (``validFor``); an open end is unbounded."""

    start: datetime | None
    end: datetime | None

    def contains(self, when: datetime) -> bool:
        return (self.start is None or self.start <= when) and (self.end is None or when <= self.end)


@dataclass(frozen=True, slots=True)
class LogKey:
    """A transparency or certificate-transparency log: its key, id and window."""

    log_id: bytes
    key: VerifyingKey
    window: Window
    url: str


@dataclass(frozen=True, slots=True)
class Authority:
    """A certificate authority (Fulcio) or timestamp authority: its chain, leaf-most first
    and ending in the self-signed root, and its window."""

    chain: tuple[x509.Certificate, ...]
    window: Window
    uri: str


@dataclass(frozen=True, slots=True)
class TrustedRoot:
    name: str
    tlogs: Mapping[bytes, LogKey]
    ctlogs: Mapping[bytes, LogKey]
    certificate_authorities: tuple[Authority, ...]
    timestamp_authorities: tuple[Authority, ...]

    @classmethod
    def from_json(cls, data: bytes, name: str) -> TrustedRoot:
        try:
            doc = json_object(data, name)
        except SignatureInvalid as exc:
            raise TrustRootInvalid(exc.message) from exc
        media_type = doc.get("mediaType")
        if media_type not in TRUSTED_ROOT_MEDIA_TYPES:
            raise TrustRootInvalid(f"{name}: mediaType {media_type!r} is not a Sigstore trusted root")
        return cls(
            name=name,
            tlogs=_logs(doc.get("tlogs"), f"{name}: tlogs"),
            ctlogs=_logs(doc.get("ctlogs"), f"{name}: ctlogs"),
            certificate_authorities=_authorities(doc.get("certificateAuthorities"), f"{name}: certificateAuthorities"),
            timestamp_authorities=_authorities(doc.get("timestampAuthorities"), f"{name}: timestampAuthorities"),
        )


def load_trusted_root(path: Path) -> TrustedRoot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustRootInvalid(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return TrustedRoot.from_json(data, str(path))


def default_trusted_root() -> TrustedRoot:
    """The Sigstore public-good root shipped as package data."""
    data = resources.files("proxy.trust").joinpath("data/trusted_root.json").read_bytes()
    return TrustedRoot.from_json(data, DEFAULT_NAME)


class RootHolder:
    """The default trusted root, shared by every rule that names none: the shipped one
    until a TUF refresh (``proxy.trust.tufroot``) installs a newer one. Rules keep the
    holder, not the root, and read ``current`` at each verification, so a refreshed root
    applies from then on without reloading policies. One object per app (never global)."""

    def __init__(self, root: TrustedRoot | None = None) -> None:
        self._root = root if root is not None else default_trusted_root()

    @property
    def current(self) -> TrustedRoot:
        return self._root

    def replace(self, root: TrustedRoot) -> None:
        self._root = root  # one reference assignment: readers see the old or the new root


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TrustRootInvalid(f"{where}: expected a list")
    return value


def _logs(value: Any, where: str) -> Mapping[bytes, LogKey]:
    logs: dict[bytes, LogKey] = {}
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        try:
            key_doc = item["publicKey"]
            key = load_der_public_key(_bytes(key_doc["rawBytes"]), name=f"{at}.publicKey")
            log_id = _bytes(item["logId"]["keyId"])
            window = _window(key_doc.get("validFor"), f"{at}.publicKey.validFor")
        except (KeyError, TypeError, ValueError, binascii.Error, ConfigError) as exc:
            raise TrustRootInvalid(f"{at}: {getattr(exc, 'message', exc)!s}") from exc
        logs[log_id] = LogKey(log_id, key, window, str(item.get("baseUrl", "")))
    return MappingProxyType(logs)


def _authorities(value: Any, where: str) -> tuple[Authority, ...]:
    found = []
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        try:
            raw = item["certChain"]["certificates"]
            chain = tuple(x509.load_der_x509_certificate(_bytes(c["rawBytes"])) for c in raw)
            window = _window(item.get("validFor"), f"{at}.validFor")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise TrustRootInvalid(f"{at}: {exc}") from exc
        if not chain:
            raise TrustRootInvalid(f"{at}.certChain: no certificates")
        found.append(Authority(chain, window, str(item.get("uri", ""))))
    return tuple(found)


def _window(value: Any, where: str) -> Window:
    if value is None:
        return Window(None, None)
    return Window(_time(value.get("start"), where), _time(value.get("end"), where))


def _time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise TrustRootInvalid(f"{where}: not an RFC 3339 time: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)
