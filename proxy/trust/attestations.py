"""What an attestation rule asks of a verified in-toto statement beyond its signer and
predicate type: conditions on predicate fields and a maximum age.

Conditions map a dotted field path inside the predicate to a wanted value, exact or glob
(``proxy.oci.globs``): ``runDetails.builder.id: "https://github.com/actions/runner/*"`` for
SLSA v1 provenance (https://slsa.dev/spec/v1.0/provenance), ``builder.id`` and
``invocation.configSource.uri`` for SLSA v0.2. A missing field, or one that is not a
string, number or boolean, does not match.

``maxAge`` bounds the statement's age: the time the predicate records (scan finished,
build finished) when it has one, else the verified signing time (log or timestamp).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from proxy.trust.checks import Outcome
from proxy.trust.cosign import Reason
from proxy.trust.identity import Matcher

# Where well-known predicates record when they were made (first found wins).
TIME_FIELDS = (
    "metadata.scanFinishedOn",  # cosign vuln (https://github.com/sigstore/cosign/blob/main/specs/COSIGN_VULN_ATTESTATION_SPEC.md)
    "scanner.result.scanFinishedOn",
    "runDetails.metadata.finishedOn",  # SLSA v1
    "metadata.buildFinishedOn",  # SLSA v0.2
    "timestamp",
)


@dataclass(frozen=True, slots=True)
class StatementRequirements:
    conditions: Mapping[str, Matcher] = field(default_factory=dict)
    max_age: float | None = None  # seconds

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", MappingProxyType(dict(self.conditions)))

    def unmet(self, outcome: Outcome, now: datetime) -> tuple[Reason, str] | None:
        """None when the verified statement meets every requirement; else why not."""
        statement = outcome.statement or {}
        predicate = statement.get("predicate")
        for path, wanted in self.conditions.items():
            value = _scalar(field_at(predicate, path))
            if value is None or not wanted.matches(value):
                found = "absent" if value is None else repr(value)
                return Reason.CONDITION_FAILED, f"{path} is {found}, wanted {wanted.describe()!r}"
        if self.max_age is not None:
            made = _made_at(predicate) or outcome.signed_at
            if made is None:
                return Reason.TOO_OLD, "statement has no time to apply maxAge to"
            age = (now - made).total_seconds()
            if age > self.max_age:
                return Reason.TOO_OLD, f"made {made:%Y-%m-%dT%H:%M:%SZ}, older than {self.max_age:.0f}s"
        return None


def field_at(doc: Any, path: str) -> Any:
    """The value at a dotted path (``a.b.c``); list items by index (``subject.0.name``)."""
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _made_at(predicate: Any) -> datetime | None:
    for path in TIME_FIELDS:
        value = field_at(predicate, path)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                continue
            if parsed.tzinfo is not None:
                return parsed
    return None
