"""Registry authentication challenges and the bearer tokens they lead to.

Token flow: https://distribution.github.io/distribution/spec/auth/token/ — a 401 carries
``WWW-Authenticate: Bearer realm="...",service="...",scope="..."``; we GET the realm with
``service`` and ``scope`` (Basic credentials if configured), and use the returned ``token``
(or ``access_token``) until ``expires_in`` (default 60 s) runs out.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

_PARAM_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
DEFAULT_EXPIRY = 60.0
# Refresh a little early so a token does not expire between our check and the upstream's.
_EXPIRY_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header (RFC 7235 auth-params)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires: float  # monotonic


class TokenCache:
    """Tokens per (realm, service, scope); never shared across upstreams (each upstream has
    its own cache) because tokens carry that upstream's credentials' rights."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], Token] = {}

    def get(self, realm: str, service: str, scope: str) -> str | None:
        token = self._tokens.get((realm, service, scope))
        if token is None or token.expires <= time.monotonic():
            return None
        return token.value

    def put(self, realm: str, service: str, scope: str, value: str, expires_in: float | None) -> None:
        lifetime = max((expires_in or DEFAULT_EXPIRY) - _EXPIRY_MARGIN, 1.0)
        self._tokens[(realm, service, scope)] = Token(value, time.monotonic() + lifetime)

    def drop(self, realm: str, service: str, scope: str) -> None:
        self._tokens.pop((realm, service, scope), None)
