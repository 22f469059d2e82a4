"""Short-lived bearer tokens the mirror issues to its own clients (Docker's token flow,
https://distribution.github.io/distribution/spec/auth/token/).

Why a token flow and not only Basic: clients decide whether to send credentials from the
``GET /v2/`` ping. skopeo/podman/CRI-O (containers/image) send none when it answers 200, and
docker gives up on a Basic challenge when it has no credentials. Answering the ping with a
Bearer challenge, and issuing tokens to anyone (anonymous ones without credentials), lets
every client pull public repositories anonymously and private ones with its credentials —
as Docker Hub does.

A token names an identity, not a scope: rules are evaluated on every request, so a rule
change applies at once. Format: ``pgt1.<base64url JSON {sub, exp}>.<base64url HMAC-SHA256>``
under a key from ``access.token_secret_env`` (shared by replicas) or, without one, a random
per-process key (tokens then die with the process; clients fetch new ones on the next 401).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass

from proxy.oci import jsondoc

_PREFIX = "pgt1."


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str | None  # None: anonymous
    expires: float  # unix time


class AccessTokens:
    def __init__(self, key: bytes, ttl: float) -> None:
        self._key = key
        self.ttl = ttl

    @staticmethod
    def looks_like(token: str) -> bool:
        return token.startswith(_PREFIX)

    def issue(self, subject: str | None, now: float | None = None) -> str:
        now = time.time() if now is None else now
        expires = math.ceil(now + self.ttl)  # whole seconds, never shorter than the ttl
        payload = json.dumps({"sub": subject or "", "exp": expires}, separators=(",", ":")).encode()
        body = _PREFIX + _b64(payload)
        return f"{body}.{_b64(self._sign(body))}"

    def verify(self, token: str, now: float | None = None) -> TokenClaims | None:
        """The claims of a token we signed, else None. Expired tokens come back with their
        claims (the caller tells expiry from forgery: only forgery counts as a failed login)."""
        body, _, signature = token.rpartition(".")
        if not body.startswith(_PREFIX) or len(token) > 2048:
            return None
        # The signature first: nothing an outsider wrote reaches the JSON parser (a body of
        # 1,400 '[' once raised RecursionError here, a 500 for an unauthenticated request).
        try:
            if not hmac.compare_digest(_unb64(signature), self._sign(body)):
                return None
            payload = jsondoc.parse_object(_unb64(body[len(_PREFIX) :]), "token", max_depth=2)
        except (binascii.Error, ValueError, jsondoc.JsonInvalid):
            return None
        subject, expires = payload.get("sub"), payload.get("exp")
        if not isinstance(subject, str) or not isinstance(expires, int) or isinstance(expires, bool):
            return None
        return TokenClaims(subject or None, float(expires))

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
