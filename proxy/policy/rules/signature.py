"""The ``signatures`` policy rule: only images whose cosign signatures verify — against the
policy's keys, or keyless against Fulcio identities — are admitted (``threshold`` distinct
keys and identities; keyed signatures optionally logged in Rekor).

```yaml
signatures:
  keys:
    - name: release
      publicKey: |
        -----BEGIN PUBLIC KEY-----
        ...
    - name: ci
      publicKeyFile: keys/ci.pub      # relative to the policy file
  keyless:                            # Fulcio certificates (cosign sign without a key)
    - issuer: https://token.actions.githubusercontent.com
      subject: "https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*"
      # or issuerRegExp / subjectRegExp; optional extensions: {sourceRepositoryURI: ...}
  trustedRoot: /etc/pullgate/trusted_root.json   # optional; default: Sigstore public good
  threshold: 1                        # keys and keyless identities both count
  transparencyLog:                    # keyed signatures must also be in this Rekor
    publicKeyFile: keys/rekor.pub
  cacheTTL: 10m          # how long a successful verification of a digest is reused
  failureCacheTTL: 30s   # failures are retried sooner (a signature may just have been pushed)
```

Keyless signatures always need a transparency-log entry and a verified signing time (see
``proxy.trust.checks``). Verification happens in-process on the digest the pod will run —
the pinned digest under ``resolveTags`` — from signature objects fetched through the
mirror's cache, by the verification service pull-time enforcement uses too. Results are
cached per digest for the life of this rule (one policy version).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import ConfigError
from proxy.policy import fields
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import ImageContext, Origin, ResolutionFailed, Rule
from proxy.policy.rules.signers import SIGNER_FIELDS, parse_signers, threshold, transparency_log_key
from proxy.trust.service import VerificationCache
from proxy.trust.verification import SignaturePolicy

NAME = "signatures"
_FIELDS = (*SIGNER_FIELDS, "threshold", "transparencyLog", "cacheTTL", "failureCacheTTL")


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


def build(value: object, path: str, origin: Origin) -> Rule | None:
    doc = fields.mapping(value, path, _FIELDS)
    signers = parse_signers(doc, path, origin)
    count = threshold(doc.get("threshold", 1), f"{path}.threshold", signers.count)
    log_key = transparency_log_key(doc, path, origin)
    try:
        policy = SignaturePolicy(signers.keys, count, log_key, signers.identities, signers.trusted_root)
    except ConfigError as exc:
        raise FieldError(f"{path}.keys", exc.message) from exc
    return Signatures(policy, cache(doc, path))


def cache(doc: Mapping[str, Any], path: str) -> VerificationCache:
    return VerificationCache(
        ttl=fields.duration(doc.get("cacheTTL", "10m"), f"{path}.cacheTTL"),
        failure_ttl=fields.duration(doc.get("failureCacheTTL", "30s"), f"{path}.failureCacheTTL"),
    )
