"""Every ``spec.rules`` kind by key: the built-in reference rules plus the rules that look
at the image itself (signatures, content). Kept apart from ``proxy.rules`` so that rule
modules can import the rule protocol without a cycle."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy import imagerules, signaturerule
from proxy.rules import BUILTIN_RULES, RuleFactory

RULES: Mapping[str, RuleFactory] = MappingProxyType(
    {
        **BUILTIN_RULES,
        signaturerule.NAME: signaturerule.build,
        imagerules.NAME: imagerules.build,
    }
)
