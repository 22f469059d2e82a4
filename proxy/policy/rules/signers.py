"""Who may sign, as ``signatures`` and ``attestations`` rules write it: ``keys`` (PEM public
keys, inline or from files), ``keyless`` identities (Fulcio certificates: issuer and subject,
exact/glob or regular expression, plus certificate extensions), the ``trustedRoot`` those
are checked against (default: the Sigstore public-good root shipped with pullgate, or
what a TUF refresh installed: ``Origin.roots``), and a
``transparencyLog`` key for keyed signatures.

```yaml
keys:
  - name: release
    publicKeyFile: keys/release.pub      # or publicKey: | PEM
keyless:
  - issuer: https://token.actions.githubusercontent.com
    subject: "https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*"
    # or issuerRegExp / subjectRegExp (the whole value must match)
    extensions: {sourceRepositoryOwnerURI: https://github.com/acme}
trustedRoot: /etc/pullgate/trusted_root.json   # relative paths: to the policy file
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.policy import fields
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import Origin
from proxy.trust.certificates import EXTENSIONS
from proxy.trust.identity import KeylessIdentity
from proxy.trust.keys import VerifyingKey, load_public_key
from proxy.trust.trustroot import RootHolder, TrustedRoot, load_trusted_root

SIGNER_FIELDS = ("keys", "keyless", "trustedRoot")
_KEYLESS_FIELDS = ("issuer", "issuerRegExp", "subject", "subjectRegExp", "extensions")


@dataclass(frozen=True, slots=True)
class Signers:
    keys: Mapping[str, VerifyingKey]
    identities: tuple[KeylessIdentity, ...]
    trusted_root: TrustedRoot | RootHolder | None  # set when there are identities

    @property
    def count(self) -> int:
        return len(self.keys) + len(self.identities)


def parse_signers(doc: Mapping[str, Any], path: str, origin: Origin) -> Signers:
    """``keys`` and/or ``keyless`` (at least one signer), and ``trustedRoot``."""
    keys = _keys(doc.get("keys"), f"{path}.keys", origin.base) if doc.get("keys") is not None else {}
    identities = _keyless(doc.get("keyless"), f"{path}.keyless") if doc.get("keyless") is not None else ()
    if not keys and not identities:
        raise FieldError(f"{path}.keys", "expected a non-empty list of keys (or keyless identities)")
    root = None
    if identities:
        root = _trusted_root(doc.get("trustedRoot"), f"{path}.trustedRoot", origin)
    elif doc.get("trustedRoot") is not None:
        raise FieldError(f"{path}.trustedRoot", "only used with keyless identities")
    return Signers(keys, identities, root)


def _keys(value: object, path: str, base: Path) -> dict[str, VerifyingKey]:
    if not isinstance(value, list) or not value:
        raise FieldError(path, "expected a non-empty list of keys")
    keys: dict[str, VerifyingKey] = {}
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        key_doc = fields.mapping(entry, where, ("name", "publicKey", "publicKeyFile"))
        name = fields.string(key_doc.get("name"), f"{where}.name")
        if name in keys:
            raise FieldError(f"{where}.name", f"duplicate key name {name!r}")
        keys[name] = public_key(key_doc, where, base)
    return keys


def _keyless(value: object, path: str) -> tuple[KeylessIdentity, ...]:
    if not isinstance(value, list) or not value:
        raise FieldError(path, "expected a non-empty list of identities")
    found: list[KeylessIdentity] = []
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        doc = fields.mapping(entry, where, _KEYLESS_FIELDS)
        text = {k: fields.string(doc[k], f"{where}.{k}") for k in _KEYLESS_FIELDS[:4] if k in doc}
        ext_doc = fields.mapping(doc.get("extensions"), f"{where}.extensions", _known_extensions())
        extensions = {k: fields.string(v, f"{where}.extensions.{k}") for k, v in ext_doc.items()}
        try:
            identity = KeylessIdentity.of(
                issuer=text.get("issuer"),
                subject=text.get("subject"),
                issuer_regexp=text.get("issuerRegExp"),
                subject_regexp=text.get("subjectRegExp"),
                extensions=extensions,
            )
        except ConfigError as exc:
            raise FieldError(where, exc.message.removeprefix("keyless identity: ")) from exc
        if any(other.name == identity.name for other in found):  # same subject, other issuer
            identity = KeylessIdentity(f"{identity.name} #{i}", identity.issuer, identity.subject, identity.extensions)
        found.append(identity)
    return tuple(found)


def _known_extensions() -> tuple[str, ...]:
    return tuple(EXTENSIONS)


def _trusted_root(value: object, path: str, origin: Origin) -> TrustedRoot | RootHolder:
    if value is None:
        return origin.roots  # the default root, read at each verification (a TUF refresh replaces it)
    file = origin.base / fields.string(value, path)
    try:
        return load_trusted_root(file)
    except ConfigError as exc:
        raise FieldError(path, exc.message) from exc


def public_key(doc: Mapping[str, Any], where: str, base: Path) -> VerifyingKey:
    """``publicKey`` (PEM text) or ``publicKeyFile`` (relative to the policy file)."""
    if ("publicKey" in doc) == ("publicKeyFile" in doc):
        raise FieldError(where, "give exactly one of publicKey or publicKeyFile")
    if "publicKey" in doc:
        pem, field_path = fields.string(doc["publicKey"], f"{where}.publicKey"), f"{where}.publicKey"
    else:
        field_path = f"{where}.publicKeyFile"
        file = base / fields.string(doc["publicKeyFile"], field_path)
        try:
            pem = file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise FieldError(field_path, f"cannot read {file}: {exc}") from exc
    try:
        return load_public_key(pem, name=field_path)
    except ConfigError as exc:
        raise FieldError(field_path, exc.message) from exc


def transparency_log_key(doc: Mapping[str, Any], path: str, origin: Origin) -> VerifyingKey | None:
    """The Rekor key of ``PATH.transparencyLog`` (``publicKey`` or ``publicKeyFile``), if any."""
    if doc.get("transparencyLog") is None:
        return None
    where = f"{path}.transparencyLog"
    log_doc = fields.mapping(doc["transparencyLog"], where, ("publicKey", "publicKeyFile"))
    return public_key(log_doc, where, origin.base)


def threshold(value: object, path: str, signers: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= signers:
        raise FieldError(path, f"must be a whole number from 1 to {signers}, got {value!r}")
    return value
