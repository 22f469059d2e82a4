"""Path globs for image names, registries, tags and namespaces.

``*`` matches within one ``/``-separated segment, ``**`` spans segments (as in gitignore):
``ghcr.io/acme/**`` matches ``ghcr.io/acme/app`` and ``ghcr.io/acme/team/app``;
``docker.io/library/*`` matches ``docker.io/library/nginx`` only; ``a/**/b`` also matches
``a/b``. Every other character is literal. A set of globs compiles to one anchored regex.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Tokens in the order they are tried at each position (longest first).
_SPECIAL = (
    ("/**/", "/(?:.*/)?"),
    ("**/", "(?:.*/)?"),
    ("/**", "/.+"),
    ("**", ".*"),
    ("*", "[^/]*"),
)


def glob_to_regex(pattern: str) -> str:
    """The (unanchored) regex source for one glob."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        for token, regex in _SPECIAL:
            if not pattern.startswith(token, i):
                continue
            # '**/' only as a prefix, '/**' only as a suffix: elsewhere they are '*'s + '/'
            if (token == "**/" and i != 0) or (token == "/**" and i + 3 != len(pattern)):
                continue
            out.append(regex)
            i += len(token)
            break
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class GlobSet:
    """Globs that match when any of them matches the whole text."""

    patterns: tuple[str, ...]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> GlobSet:
        patterns = tuple(patterns)
        if not patterns:
            return cls((), None)
        source = "|".join(f"(?:{glob_to_regex(p)})" for p in patterns)
        return cls(patterns, re.compile(rf"^(?:{source})\Z", re.DOTALL))

    def match(self, text: str) -> bool:
        return self.regex is not None and self.regex.match(text) is not None

    def __bool__(self) -> bool:
        return bool(self.patterns)
