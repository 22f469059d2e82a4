"""Every ``spec.rules`` kind by key: the built-in reference rules plus the rules that look
at the image itself (signatures, content). Kept apart from ``proxy.policy.rules.base`` so that rule
modules can import the rule protocol without a cycle."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy.policy.rules import attestation as attestationrule
from proxy.policy.rules import image as imagerules
from proxy.policy.rules import signature as signaturerule
from proxy.policy.rules.base import BUILTIN_RULES, RuleFactory

RULES: Mapping[str, RuleFactory] = MappingProxyType(
    {
        **BUILTIN_RULES,
        signaturerule.NAME: signaturerule.build,
        attestationrule.NAME: attestationrule.build,
        imagerules.NAME: imagerules.build,
    }
)
