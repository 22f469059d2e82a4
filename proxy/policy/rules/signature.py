"""The ``signatures`` policy rule: only images whose cosign signatures verify against the
policy's keys (``threshold`` distinct keys; optionally logged in Rekor) are admitted.

```yaml
signatures:
  keys:
    - name: release
      publicKey: |
        -----BEGIN PUBLIC KEY-----
        ...
    - name: ci
      publicKeyFile: keys/ci.pub      # relative to the policy file
  threshold: 1
  transparencyLog:
    publicKeyFile: keys/rekor.pub
  cacheTTL: 10m          # how long a successful verification of a digest is reused
  failureCacheTTL: 30s   # failures are retried sooner (a signature may just have been pushed)
```

Verification happens in-process (``proxy.trust.verification``) on the digest the pod will run —
the pinned digest under ``resolveTags`` — from signature objects fetched through the
mirror's cache. Results are cached per digest for the life of this rule (one policy
version), successes longer than failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import ConfigError
from proxy.policy import fields
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import ImageContext, ResolutionFailed, Rule
from proxy.trust.keys import VerifyingKey, load_public_key
from proxy.trust.verification import SignaturePolicy, VerificationCache

NAME = "signatures"


@dataclass(frozen=True)
class Signatures:
    name = NAME
    policy: SignaturePolicy
    cache: VerificationCache = field(default_factory=VerificationCache, compare=False)

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        try:
            result = await image.facts.signatures(self.policy, self.cache)
        except ResolutionFailed as exc:
            return (f"requires signed images, but verification could not run: {exc.reason}",)
        if result.allowed:
            return ()
        return (f"requires a valid signature: {result.message()}",)


def build(value: object, path: str, base: Path) -> Rule | None:
    doc = fields.mapping(value, path, ("keys", "threshold", "transparencyLog", "cacheTTL", "failureCacheTTL"))
    keys_doc = doc.get("keys")
    if not isinstance(keys_doc, list) or not keys_doc:
        raise FieldError(f"{path}.keys", "expected a non-empty list of keys")
    keys: dict[str, VerifyingKey] = {}
    for i, entry in enumerate(keys_doc):
        where = f"{path}.keys[{i}]"
        key_doc = fields.mapping(entry, where, ("name", "publicKey", "publicKeyFile"))
        name = fields.string(key_doc.get("name"), f"{where}.name")
        if name in keys:
            raise FieldError(f"{where}.name", f"duplicate key name {name!r}")
        keys[name] = _key(key_doc, where, base)
    threshold = doc.get("threshold", 1)
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= len(keys):
        raise FieldError(f"{path}.threshold", f"must be a whole number from 1 to {len(keys)}, got {threshold!r}")
    log_key = None
    if doc.get("transparencyLog") is not None:
        where = f"{path}.transparencyLog"
        log_key = _key(fields.mapping(doc["transparencyLog"], where, ("publicKey", "publicKeyFile")), where, base)
    cache = VerificationCache(
        ttl=fields.duration(doc.get("cacheTTL", "10m"), f"{path}.cacheTTL"),
        failure_ttl=fields.duration(doc.get("failureCacheTTL", "30s"), f"{path}.failureCacheTTL"),
    )
    try:
        return Signatures(SignaturePolicy(keys, threshold, log_key), cache)
    except ConfigError as exc:
        raise FieldError(f"{path}.keys", exc.message) from exc


def _key(doc: dict[str, object] | object, where: str, base: Path) -> VerifyingKey:
    assert isinstance(doc, dict)
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
