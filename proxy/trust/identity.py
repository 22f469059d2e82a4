"""Keyless identities a policy accepts: the OIDC issuer and the certificate subject, each
exact, a glob, or a regular expression, plus Fulcio certificate extensions (GitHub
Actions claims such as ``sourceRepositoryURI``, ``buildTrigger``).

Globs are the policy globs of ``proxy.oci.globs`` (``*`` within a ``/`` segment, ``**``
across), so ``https://github.com/acme/*/.github/workflows/release.yml@refs/tags/*`` takes
any repository of ``acme`` but not a workflow in a subdirectory. Regular expressions must
match the WHOLE value (Python ``re.fullmatch``): cosign's ``--certificate-identity-regexp``
searches, which lets ``acme`` match ``https://evil.example/acme``; anchoring refuses that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.errors import ConfigError
from proxy.oci.globs import glob_to_regex
from proxy.trust.certificates import EXTENSIONS, CertIdentity
from proxy.trust.cosign import Reason


@dataclass(frozen=True, slots=True)
class Matcher:
    """One wanted value: ``text`` as written, ``kind`` exact | glob | regexp."""

    text: str
    kind: str
    pattern: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def literal(cls, text: str) -> Matcher:
        """Exact, or a glob when ``text`` contains ``*``."""
        if "*" in text:
            return cls(text, "glob", re.compile(glob_to_regex(text), re.DOTALL))
        return cls(text, "exact", re.compile(re.escape(text)))

    @classmethod
    def regexp(cls, text: str, where: str) -> Matcher:
        try:
            return cls(text, "regexp", re.compile(text))
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regular expression: {exc}") from exc

    def matches(self, value: str) -> bool:
        return self.pattern.fullmatch(value) is not None

    def describe(self) -> str:
        return f"/{self.text}/" if self.kind == "regexp" else self.text


@dataclass(frozen=True, slots=True)
class KeylessIdentity:
    """One ``keyless`` entry of a policy; ``name`` is how results and denials call it."""

    name: str
    issuer: Matcher
    subject: Matcher
    extensions: Mapping[str, Matcher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.extensions) - set(EXTENSIONS))
        if unknown:
            known = ", ".join(EXTENSIONS)
            raise ConfigError(f"{self.name}: unknown certificate extension {unknown[0]!r} (known: {known})")
        object.__setattr__(self, "extensions", MappingProxyType(dict(self.extensions)))

    @classmethod
    def of(
        cls,
        *,
        issuer: str | None = None,
        subject: str | None = None,
        issuer_regexp: str | None = None,
        subject_regexp: str | None = None,
        extensions: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> KeylessIdentity:
        """From policy/CLI values: exactly one of each pair must be given."""
        where = name or "keyless identity"
        if (issuer is None) == (issuer_regexp is None):
            raise ConfigError(f"{where}: give exactly one of issuer or issuerRegExp")
        if (subject is None) == (subject_regexp is None):
            raise ConfigError(f"{where}: give exactly one of subject or subjectRegExp")
        issuer_m = Matcher.literal(issuer) if issuer is not None else Matcher.regexp(str(issuer_regexp), where)
        subject_m = Matcher.literal(subject) if subject is not None else Matcher.regexp(str(subject_regexp), where)
        ext = {k: Matcher.literal(v) for k, v in (extensions or {}).items()}
        return cls(name or subject_m.describe(), issuer_m, subject_m, ext)

    def mismatch(self, found: CertIdentity) -> tuple[Reason, str] | None:
        """None when ``found`` is this identity; else the reason and found-vs-wanted."""
        if not self.issuer.matches(found.issuer):
            return Reason.ISSUER_MISMATCH, f"issuer {found.issuer or '(none)'!r}, wanted {self.issuer.describe()!r}"
        if not self.subject.matches(found.subject):
            return (
                Reason.IDENTITY_MISMATCH,
                f"identity {found.subject or '(none)'!r} (issuer {found.issuer}), wanted {self.subject.describe()!r}",
            )
        for name, wanted in self.extensions.items():
            value = found.extensions.get(name)
            if value is None or not wanted.matches(value):
                return Reason.EXTENSION_MISMATCH, f"{name} {value or '(absent)'!r}, wanted {wanted.describe()!r}"
        return None
