"""Password and token hashes for client authentication: parse, verify, never store plain.

Supported password hashes (the formats ``htpasswd`` files and password libraries write):

- bcrypt ``$2y$``/``$2b$``/``$2a$`` — Apache ``htpasswd -B`` (``$2y$``), pyca ``bcrypt``;
- argon2 ``$argon2id$``/``$argon2i$`` (PHC string) — ``argon2-cffi``, ``argon2`` CLI;
- scrypt ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>`` — passlib's format; salt and hash
  are base64 without padding, either alphabet (passlib's ``.`` for ``+`` is accepted).

Plain text, ``{SHA}``, ``$apr1$`` (MD5) and crypt(3) DES are rejected when the file loads:
they are fast to brute-force once the file leaks.

Static bearer tokens are random strings; the tokens file holds ``name:sha256:<hex>``, the
SHA-256 of the token. A slow hash buys nothing for 128+ bits of randomness, and a fast one
lets every request be checked without a cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

import argon2
import bcrypt

_SCRYPT_RE = re.compile(r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/.]+)\$([A-Za-z0-9+/.]+)$")
_SCRYPT_MAX_LN = 20  # N = 2^20 with r=8 needs 1 GiB; anything larger is a mistake or an attack
_SCRYPT_MAXMEM = 1 << 30
_TOKEN_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$")


class HashFormatError(ValueError):
    """A stored hash of an unsupported or malformed kind (the message never quotes it)."""


@dataclass(frozen=True, slots=True)
class PasswordHash:
    scheme: str  # bcrypt, argon2, scrypt
    encoded: str

    @classmethod
    def parse(cls, encoded: str) -> PasswordHash:
        if encoded.startswith(_BCRYPT_PREFIXES):
            if len(encoded) != 60:
                raise HashFormatError("malformed bcrypt hash")
            return cls("bcrypt", encoded)
        if encoded.startswith(_ARGON2_PREFIXES):
            try:
                argon2.extract_parameters(encoded)
            except argon2.exceptions.InvalidHashError as exc:
                raise HashFormatError("malformed argon2 hash") from exc
            return cls("argon2", encoded)
        if encoded.startswith("$scrypt$"):
            _scrypt_parts(encoded)
            return cls("scrypt", encoded)
        raise HashFormatError("unsupported hash: use bcrypt (htpasswd -B), argon2id or $scrypt$")

    def verify(self, password: str) -> bool:
        """Slow by design (~0.1 s for bcrypt cost 10): call it off the event loop."""
        secret = password.encode()
        if self.scheme == "bcrypt":
            # bcrypt looks at 72 bytes only; longer passwords must not silently match a prefix.
            return len(secret) <= 72 and bcrypt.checkpw(secret, self.encoded.encode())
        if self.scheme == "argon2":
            try:
                return argon2.PasswordHasher().verify(self.encoded, secret)
            except argon2.exceptions.VerificationError:
                return False
            except argon2.exceptions.InvalidHashError:
                return False
        n, r, p, salt, expected = _scrypt_parts(self.encoded)
        actual = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
        return hmac.compare_digest(actual, expected)


def hash_scrypt(password: str, *, ln: int = 15, r: int = 8, p: int = 1, salt: bytes | None = None) -> str:
    """A ``$scrypt$`` hash in passlib's format (standard base64 alphabet, no padding)."""
    salt = salt if salt is not None else os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=1 << ln, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _scrypt_parts(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    match = _SCRYPT_RE.match(encoded)
    if match is None:
        raise HashFormatError("malformed $scrypt$ hash (expected $scrypt$ln=..,r=..,p=..$salt$hash)")
    ln, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not 1 <= ln <= _SCRYPT_MAX_LN or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * r * (1 << ln) > _SCRYPT_MAXMEM:
        raise HashFormatError("$scrypt$ parameters out of range")
    try:
        salt, key = _unb64(match.group(4)), _unb64(match.group(5))
    except (binascii.Error, ValueError) as exc:
        raise HashFormatError("malformed $scrypt$ base64") from exc
    if len(key) < 16:
        raise HashFormatError("$scrypt$ hash too short")
    return 1 << ln, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    text = text.replace(".", "+")  # passlib's "adapted base64"
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def token_digest(token: str) -> str:
    """The stored form of a bearer token: hex SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_token_hash(encoded: str) -> str:
    match = _TOKEN_RE.match(encoded)
    if match is None:
        raise HashFormatError("expected sha256:<64 lowercase hex digits>")
    return match.group(1)


def parse_htpasswd(text: str, source: str) -> dict[str, PasswordHash]:
    """``user:hash`` lines; ``#`` comments and blank lines are skipped. Errors name the line,
    never its content (it might be a plain password pasted by mistake)."""
    users: dict[str, PasswordHash] = {}
    for number, line in _lines(text):
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            raise HashFormatError(f"{source}: line {number}: expected user:hash")
        try:
            users[user] = PasswordHash.parse(encoded)
        except HashFormatError as exc:
            raise HashFormatError(f"{source}: line {number}: {exc}") from None
    return users


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """``name:sha256:<hex>`` lines -> {hex digest: name}."""
    tokens: dict[str, str] = {}
    for number, line in _lines(text):
        name, sep, encoded = line.partition(":")
        if not sep or not name:
            raise HashFormatError(f"{source}: line {number}: expected name:sha256:<hex>")
        try:
            tokens[parse_token_hash(encoded)] = name
        except HashFormatError as exc:
            raise HashFormatError(f"{source}: line {number}: {exc}") from None
    return tokens


def _lines(text: str) -> list[tuple[int, str]]:
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
