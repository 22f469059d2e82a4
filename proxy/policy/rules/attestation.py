"""The ``attestations`` policy rule: an image is admitted only with in-toto attestations
(SLSA provenance, vulnerability scans, SBOMs) of the wanted predicate type, signed by the
allowed keys or keyless identities, whose predicate meets the conditions.

```yaml
attestations:
  - name: provenance
    predicateType: https://slsa.dev/provenance/v1
    keyless:                               # or keys: [...] (as in signatures)
      - issuer: https://token.actions.githubusercontent.com
        subjectRegExp: "https://github.com/slsa-framework/slsa-github-generator/.*"
    trustedRoot: ...                       # optional, as in signatures
    conditions:                            # predicate field path -> exact value or glob
      buildDefinition.externalParameters.workflow.repository: "https://github.com/acme/*"
      runDetails.builder.id: "https://github.com/slsa-framework/*"
    maxAge: 30d                            # optional: statement time (or signing time) within
```

Attestations are found as cosign writes them: the legacy ``sha256-<hex>.att`` tag (DSSE
envelopes) and cosign v3 Sigstore bundles with in-toto payloads through the referrers API.
Verification shares the signature rule's service and cache semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.errors import ConfigError
from proxy.policy import fields
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import ImageContext, Origin, ResolutionFailed, Rule
from proxy.policy.rules.signature import cache as build_cache
from proxy.policy.rules.signers import SIGNER_FIELDS, parse_signers, threshold, transparency_log_key
from proxy.trust.attestations import StatementRequirements
from proxy.trust.checks import Purpose
from proxy.trust.identity import Matcher
from proxy.trust.service import VerificationCache
from proxy.trust.verification import SignaturePolicy

NAME = "attestations"
_FIELDS = (
    "name", "predicateType", *SIGNER_FIELDS, "threshold", "transparencyLog", "conditions", "maxAge",
    "cacheTTL", "failureCacheTTL",
)  # fmt: skip


@dataclass(frozen=True)
class Requirement:
    name: str
    predicate_type: str
    policy: SignaturePolicy
    cache: VerificationCache = field(default_factory=VerificationCache, compare=False)


@dataclass(frozen=True)
class Attestations:
    name = NAME
    requirements: tuple[Requirement, ...]

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        violations = []
        for wanted in self.requirements:
            try:
                result = await image.facts.signatures(wanted.policy, wanted.cache)
            except ResolutionFailed as exc:
                violations.append(f"requires attestation {wanted.name}, but verification could not run: {exc.reason}")
                continue
            if not result.allowed:
                message = result.message("attestations")
                violations.append(f"requires attestation {wanted.name} ({wanted.predicate_type}): {message}")
        return tuple(violations)


def build(value: object, path: str, origin: Origin) -> Rule | None:
    if not isinstance(value, list) or not value:
        raise FieldError(path, "expected a non-empty list of attestation requirements")
    built: list[Requirement] = []
    for i, entry in enumerate(value):
        requirement = _requirement(entry, f"{path}[{i}]", origin)
        if any(r.name == requirement.name for r in built):
            raise FieldError(f"{path}[{i}].name", f"duplicate attestation name {requirement.name!r}")
        built.append(requirement)
    return Attestations(tuple(built))


def _requirement(value: object, path: str, origin: Origin) -> Requirement:
    doc = fields.mapping(value, path, _FIELDS)
    name = fields.string(doc.get("name"), f"{path}.name")
    predicate = fields.string(doc.get("predicateType"), f"{path}.predicateType")
    signers = parse_signers(doc, path, origin)
    count = threshold(doc.get("threshold", 1), f"{path}.threshold", signers.count)
    log_key = transparency_log_key(doc, path, origin)
    conditions_doc = doc.get("conditions") or {}
    if not isinstance(conditions_doc, dict):
        raise FieldError(f"{path}.conditions", f"expected a mapping, got {fields.kind_of(conditions_doc)}")
    conditions = {
        str(k): Matcher.literal(fields.string(v, f"{path}.conditions.{k}")) for k, v in conditions_doc.items()
    }
    max_age = fields.duration(doc["maxAge"], f"{path}.maxAge") if doc.get("maxAge") is not None else None
    try:
        policy = SignaturePolicy(
            signers.keys,
            count,
            log_key,
            signers.identities,
            signers.trusted_root,
            Purpose(predicate),
            StatementRequirements(conditions, max_age),
        )
    except ConfigError as exc:
        raise FieldError(f"{path}.keys", exc.message) from exc
    return Requirement(name, predicate, policy, build_cache(doc, path))
